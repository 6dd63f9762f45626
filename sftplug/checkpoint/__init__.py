"""What a run leaves behind: atomic checkpoint folders, the save/restore pair, FSDP shards, export."""
