"""Data preparation: readers -> Conversation -> template + loss mask -> cached tokens -> packing."""
