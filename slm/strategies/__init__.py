"""Generation strategies: how segments become a `[K, T]` token grid and back."""
