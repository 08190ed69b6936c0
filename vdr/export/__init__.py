"""Export of trained checkpoints to serving formats (Sentence Transformers directories), written atomically."""
