"""Training code shared by the training stages (imports torch & co.: only loaded when a stage runs)."""
