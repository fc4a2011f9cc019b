"""Model plumbing: loading, generic discovery of decoder and linear layers."""
