"""Hugging Face interop: start from a LlamaForCausalLM checkpoint, and hand one back.

- config.py   config.json <-> ModelConfig (LlamaForCausalLM fields; anything we cannot run is refused)
- files.py    what a model folder holds, read without torch: names, shapes and files of its tensors
- weights.py  safetensors files: read into any layout (through DCP's Hugging Face reader, or one
              tensor at a time into ZeRO's shards), written sharded with an index
- cli.py      `meshtrain export-hf`

Our parameter names are LlamaForCausalLM's (meshtrain.model.llama), so both directions are file
formats and config mapping, no renaming. Import: `model.init_from = "hf:DIR"` (or `meshtrain train
--init-from-hf DIR`) fills the model section from DIR/config.json while the config is validated,
takes DIR's tokenizer.json unless data.tokenizer names another, and loads DIR's weights into
whatever layout the run uses, before the first step (a checkpoint to resume from wins).
"""
