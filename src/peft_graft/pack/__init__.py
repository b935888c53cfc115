"""The SkillPack on disk: the only part of peft-graft that knows pack file names, tensor keys and their encoding.

- ``layout``: file names, key prefixes, ``split_key``, the pickle rule;
- ``codec``: one module's delta as named tensors, and back (format version ``config.FORMAT_VERSION``);
- ``adapter_io``: a layer's adapter <-> its packed tensors, and the state-dict hooks' conversion;
- ``folder``: ``PackFolder``, a pack folder validated once;
- ``cost``: the bytes each form costs, for the budget planner;
- ``card``, ``provenance``: the model card, and base-model fingerprints.
"""
