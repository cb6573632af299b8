"""Model definitions: Llama-family decoders and their weight loader."""
