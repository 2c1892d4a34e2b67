"""Getting a model out of the registry: a clean Hub-style folder (`export`) and an upload (`push`)."""
