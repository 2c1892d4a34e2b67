"""Teacher-logit storage and distillation losses."""
