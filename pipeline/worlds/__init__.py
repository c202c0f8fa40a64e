"""The worlds citer builds locally: the demo world (synthetic task, tiny pair) and the smol world (SmolLM2)."""
