"""Linear attention: the gated delta rule of Gated DeltaNet layers (Qwen3.5, Qwen3-Next)."""
