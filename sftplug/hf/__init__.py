"""HF checkpoint folders: config.json, tensor names, weight files, and loading them."""
