"""The decoder model sftplug trains: the transformer, LoRA through PEFT, greedy decoding."""
