"""Project 2: a byte-level BPE tokenizer from scratch (train, encode, decode, tiktoken parity)."""
