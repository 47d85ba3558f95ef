"""PaCoRe, Parallel Coordinated Reasoning (spec section 6): K parallel rollouts, each compacted to its
conclusion (the text after the last `</think>`), then one synthesis round that answers from the problem
and those conclusions as reference responses.

- `template.py`: the synthesis prompt, byte for byte the official one, and the synthesis conversation.
- `messages.py`: compaction (conclusions, the per-message cap, the prompt budget), reference order, and
  drawing a training episode's messages from a prompt's pool.
- `inference.py`: the round loop behind `launch/pacore.py`.
"""
