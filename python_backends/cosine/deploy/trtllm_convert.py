#!/usr/bin/env python3
"""HF checkpoint -> TensorRT-LLM checkpoint, with TensorRT-LLM's own converter: its Python API (the model family's
`from_hugging_face`, which examples/models/core/<family>/convert_checkpoint.py also calls), for any family TRT-LLM
maps from the checkpoint's `architectures`.

Run as a script by build_engines.py inside the NGC trtllm container; it is the only code that imports
tensorrt_llm, and it imports nothing from this project."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model_dir", required=True, help="HF checkpoint directory")
    parser.add_argument("--output_dir", required=True, help="TensorRT-LLM checkpoint directory to write")
    parser.add_argument("--dtype", required=True, choices=("float16", "bfloat16"))
    args = parser.parse_args(argv)
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models.automodel import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_hugging_face(args.model_dir, dtype=args.dtype,
                                                   mapping=Mapping(world_size=1, rank=0, tp_size=1, pp_size=1))
    model.save_checkpoint(args.output_dir, save_config=True)


if __name__ == "__main__":
    main()
