"""Extend a Llama/Mistral model's context with Sparse-X + LoRA: the ``sparsex-finetune`` command
(``sparsex_hf/apps/finetune.py``) as a script, for ``accelerate launch``.

    python examples/finetune_long_context.py --model smollm2 --data corpus/*.txt --target-length 32768 \\
        --rope yarn --max-steps 200 --output-dir runs/smollm2-32k [--resume] [--merge]
    accelerate launch --config_file examples/accelerate/fsdp.yaml examples/finetune_long_context.py ...  # 2 GPUs
    accelerate launch --config_file examples/accelerate/ddp.yaml examples/finetune_long_context.py ...

Every flag: ``python examples/finetune_long_context.py --help``.
"""

import sys

from sparsex_hf.apps.finetune import main

if __name__ == "__main__":
    sys.exit(main())
