"""The apprentice: a retrieval-augmented UNet that generates in context from demonstrations."""
