"""Special token ids, the same for every tokenizer: the model, the batches and the search use them
without loading one."""

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_IDS = frozenset((PAD_ID, BOS_ID, EOS_ID))
"""The ids that decoding strips from a hypothesis (UNK stays: it stands for a word)."""
MASK_PIECE = "<mask>"
"""The masked-LM mask token: a SentencePiece user-defined symbol of task mlm tokenizers, so that
``<mask>`` in text encodes to it; it takes the first id after the four fixed ones."""
