"""Generation: sampler, detokenizer, the simple generator (and later the paged engine)."""
