"""Hugging Face interop, all of it: the `DeepseekV2ForCausalLM` / `DeepseekV3ForCausalLM` directory format.

- `format`: the config and tensor-name mapping between transformers and our model, reading a whole directory
  into one model (`from_hf`) and writing one out (`to_hf`, `ShardWriter`).
- `load`: a directory's weights into a run under any parallel layout (`checkpoint.init_from=<HF dir>`), each
  rank reading only the pieces it holds.
- `export`: a run's checkpoint, whatever layout wrote it, out as a directory (`python -m train.export`).
"""
