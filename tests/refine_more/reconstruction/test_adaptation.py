"""LoRA U-Net, seed state and adapted reconstruction."""
import copy

import numpy as np
import pytest
import torch

from refine_more.reconstruction.adaptation import SeedState, SeedStateError, frozen_tensors
from refine_more.config import preset
from refine_more.reconstruction.recon import reconstruct
from refine_more.evaluation.simulate import SimulationConfig, simulate_subject
from refine_more.networks.unet import LoRAConv, UNet2D, add_lora, count_parameters, merge_lora


def test_lora_with_zero_B_equals_base():
    torch.manual_seed(0)
    base = UNet2D(4, 8, 2)
    for p in base.out.parameters():  # a non-trivial base (the out layer starts at zero)
        torch.nn.init.normal_(p)
    x = torch.randn(3, 4, 20, 18)
    adapted = add_lora(copy.deepcopy(base), rank=2)
    assert torch.equal(adapted(x), base(x))


def test_lora_merge_matches_and_counts():
    torch.manual_seed(0)
    base = UNet2D(4, 8, 2)
    adapted = add_lora(copy.deepcopy(base), rank=3, beta=0.5)
    convs = [m for m in adapted.modules() if isinstance(m, LoRAConv)]
    expected = sum(3 * (m.base.weight.shape[0] + m.base.weight[0].numel()) for m in convs)
    assert count_parameters(adapted, trainable_only=True) == expected
    for m in convs:
        torch.nn.init.normal_(m.lora_B, std=0.01)
    x = torch.randn(2, 4, 16, 16)
    y = adapted(x)
    merged = merge_lora(copy.deepcopy(adapted))
    assert not any(isinstance(m, LoRAConv) for m in merged.modules())
    torch.testing.assert_close(merged(x), y, atol=1e-5, rtol=1e-5)


def test_paper_width_counts():
    unet = UNet2D(4, 32, 4)
    assert count_parameters(unet) == 7_760_484  # 4 refined maps, 1×1 out convolution
    adapted = add_lora(copy.deepcopy(unet), rank=16)
    assert count_parameters(adapted, trainable_only=True) == 513_664
    # the paper's code: 3 refined maps, 3×3 out convolution: its 517,600 LoRA factors exactly
    paper = UNet2D(3, 32, 4, out_kernel=3)
    assert count_parameters(add_lora(copy.deepcopy(paper), rank=16), trainable_only=True) == 517_600


@pytest.fixture(scope="module")
def seed_run():
    subject = simulate_subject("sub-s01", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=5)
    return subject, reconstruct(subject, preset("tiny"))


def test_seed_state_round_trip(tmp_path, seed_run):
    _, result = seed_run
    state = SeedState.from_result(result)
    assert any(k.startswith("inr.hash_time.") for k in state.arrays)
    assert any(k.startswith("unrolled.unet.") for k in state.arrays)
    path = state.save(tmp_path / "seed.safetensors")
    loaded = SeedState.load(path)
    back = SeedState.from_numpy_dict(loaded.to_numpy_dict())
    assert back.config == state.config and back.config_hash == state.config_hash and back.meta == state.meta
    assert set(back.arrays) == set(state.arrays)
    for k in state.arrays:
        np.testing.assert_array_equal(back.arrays[k], state.arrays[k])
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SeedStateError, match="junk.safetensors"):
        SeedState.load(tmp_path / "junk.safetensors")


def test_incompatible_config_fails_clearly(seed_run):
    subject, result = seed_run
    state = SeedState.from_result(result)
    cfg = preset("tiny")
    cfg.unroll.unet_width = 6
    with pytest.raises(SeedStateError, match="unroll"):
        reconstruct(subject, cfg, seed_state=state)
    warm = preset("tiny")
    warm.unroll.warm_start_steps = 2  # the U-Net was trained on another input
    with pytest.raises(SeedStateError, match="unroll"):
        state.check_compatible(warm)
    state.check_compatible(preset("tiny").replace(iters_stage1=3))  # schedules may differ


def test_adapted_run_keeps_frozen_tensors(seed_run):
    subject, result = seed_run
    state = SeedState.from_result(result)
    target = simulate_subject("sub-s02", SimulationConfig(matrix=(6, 24, 24), n_coils=4), seed=6)
    cfg = preset("tiny")
    adapted = reconstruct(target, cfg, seed_state=state.to_numpy_dict())
    assert adapted.method == "refine-more-adapted"
    assert adapted.iterations == {"stage1": cfg.adapt.iters_stage1, "stage2": cfg.adapt.iters_stage2}
    after = frozen_tensors(adapted.state["inr"], cfg)
    assert any(k.startswith("inr.hash_time.") for k in after) and any(k.startswith("inr.mlp_maps.") for k in after)
    for k, v in after.items():
        assert np.array_equal(v, state.arrays[k]), k
    # the base U-Net is frozen too: only LoRA factors (and step sizes) moved
    unet_state = adapted.state["unrolled"].unet.state_dict()
    for k, v in unet_state.items():
        if "lora_" not in k:
            assert np.array_equal(v.cpu().numpy(), state.arrays["unrolled.unet." + k.replace("base.", "")]), k
    # trainable counts are what the config says: spatial hashes (+ LoRA + step sizes in stage 2)
    inr = adapted.state["inr"]
    spatial = inr.hash_images.params.numel() + inr.hash_maps.params.numel()
    spatial += sum(p.numel() for p in inr.mlp_images.parameters())  # adapt.train_image_mlp (default)
    lora = sum(p.numel() for n, p in adapted.state["unrolled"].unet.named_parameters() if "lora_" in n)
    assert adapted.trainable_parameters == {"stage1": spatial, "stage2": spatial + lora + cfg.unroll.iterations * 4}
    assert all(np.isfinite(v).all() for v in adapted.maps.values())


def test_paper_mode_freezes_both_mlps(seed_run):
    subject, result = seed_run
    state = SeedState.from_result(result)
    cfg = preset("tiny")
    cfg.adapt.train_image_mlp = False
    adapted = reconstruct(subject, cfg, seed_state=state)
    after = frozen_tensors(adapted.state["inr"], cfg)
    assert any(k.startswith("inr.mlp_images.") for k in after)
    for k, v in after.items():
        assert np.array_equal(v, state.arrays[k]), k
