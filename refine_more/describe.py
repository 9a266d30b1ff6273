"""``refine-more describe``: a configuration as it will run, and the sizes of the models it builds.

Prints the resolved configuration (preset, file, ``--set``) as YAML, then, as the last line, one
JSON object with the parameter counts a user compares with the paper (§2.5, §4): the INR's
(hashes + MLPs), the U-Net's, and the LoRA factors an adapted run trains in it.
"""
from __future__ import annotations

import copy
import json


def model_sizes(config) -> dict:
    """Parameter counts of the models `config` builds (no data needed: the tables do not depend
    on the matrix; the U-Net's LoRA as an adapted run adds it)."""
    from refine_more.networks.inr import INR
    from refine_more.networks.unet import add_lora, count_parameters
    from refine_more.reconstruction.unrolled import UnrolledPGD

    inr = INR(n_images=8, shape=(2, 2, 2), config=config.inr, seed=config.seed)
    unet = UnrolledPGD(config.unroll).unet
    lora = add_lora(copy.deepcopy(unet), config.adapt.lora_rank, config.adapt.lora_beta)
    return {"inr_parameters": count_parameters(inr), "unet_parameters": count_parameters(unet),
            "lora_trainable_parameters": count_parameters(lora, trainable_only=True)}


def _describe(args) -> int:
    import yaml

    from refine_more.config import load_config

    config = load_config(args.config, args.preset, args.set)
    print(f"# preset {args.preset}" + (f", file {args.config}" if args.config else "")
          + "".join(f", --set {s}" for s in args.set) + f"; config hash {config.hash()}")
    print(yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=None).rstrip())
    print(json.dumps(model_sizes(config)))
    return 0


def add_commands(sub) -> None:
    """describe."""
    from refine_more.cli import add_config_arguments

    d = sub.add_parser("describe", help="print a resolved configuration and its models' parameter counts",
                       description="The resolved configuration as YAML; the last line is JSON with "
                                   "inr_parameters, unet_parameters and lora_trainable_parameters.")
    add_config_arguments(d, default_preset="paper")
    d.set_defaults(func=_describe)
