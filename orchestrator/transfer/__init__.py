"""Moving bytes: one file to disk, ranges, proven spans, verification, signed URLs."""
