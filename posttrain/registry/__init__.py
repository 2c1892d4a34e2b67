"""The shared checkpoint registry."""
from posttrain.registry.entry_keys import entry_key, short
from posttrain.registry.store import CorruptEntry, Entry, Registry, resolve_root

__all__ = ["CorruptEntry", "Entry", "Registry", "entry_key", "resolve_root", "short"]
