"""Training data: records -> chat template -> tokens and loss mask -> packed rows -> micro-batches."""
