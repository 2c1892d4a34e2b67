"""What a recipe will do before anything runs: every stage's registry key and memory estimate."""
