"""The language-model runtime shared by LM agents and token environments: text datasets and buffers
(`orl.text.data`), model loading, tokenization, generation, LoRA and data parallel (`orl.text.runtime`)."""
