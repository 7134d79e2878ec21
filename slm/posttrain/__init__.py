"""Post-training on spoken replies: on-policy distillation from a text teacher (`distill`),
DPO (`dpo`) and GRPO (`grpo`), each a loss over rollouts of slm's own sampler (`rollout`),
trained by `slm train`'s step with its checkpoints and exact resume (`trainer`). Methods are
found by name in `METHODS` (`method`); a new one is a module plus `register_method`.

google-tunix was evaluated first: its loss formulas are the ones used here, its trainers are
not (each module's docstring says why), and it is no dependency: `pip install --dry-run
google-tunix` (0.1.7) would install or change 26 packages, transformers 5.24 -> 5.12.1 among
them.
"""

# Importing the built-in methods' modules registers them, in the order `slm posttrain` lists them
from slm.posttrain import distill, dpo, grpo  # noqa: F401, I001
from slm.posttrain.method import METHODS, MethodSetup, register_method  # noqa: F401
