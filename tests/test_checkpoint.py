"""checkpoint: family detection, strict meta-device loading, atomic save, typed one-line errors."""

import pytest
import safetensors.torch
import torch

from eridiffusion import checkpoint, weights
from eridiffusion.checkpoint import (
    FAMILIES,
    FamilyMismatch,
    KeyMismatch,
    NotAModel,
    detect,
    load,
    save,
    tiny_components,
)
from eridiffusion.models.unet import sdxl_vector
from eridiffusion.weights import PickleRefused, ShapeMismatch, WeightError, WeightLoader

TINY = ("sdxl-tiny", "sd15-tiny")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """family name -> (in-memory Components, path of the saved fp32 file)."""
    d = tmp_path_factory.mktemp("ckpt")
    out = {}
    for fam in TINY:
        comps = tiny_components(fam, seed=1)
        out[fam] = (comps, save(comps, d / f"{fam}.safetensors"))
    return out


def _state(path):
    return safetensors.torch.load_file(str(path))


def _write(path, state):
    safetensors.torch.save_file(state, str(path))
    return path


def _outputs(c, dtype=torch.float32):
    """Deterministic forward outputs of every part (inputs built here, seeded)."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 49406, (1, 77), generator=g)
    ids[:, 0], ids[:, 20] = 49406, 49407
    out = {}
    t1 = c.te1(ids)
    out["te1.hidden"], out["te1.pooled"] = t1.hidden, t1.pooled
    if c.te2 is not None:
        t2 = c.te2(ids)
        out["te2.hidden"], out["te2.pooled"] = t2.hidden, t2.pooled
        context = torch.cat([t1.hidden, t2.hidden], dim=-1)  # (1, 77, 96)
        time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])
        y = sdxl_vector(t2.pooled, time_ids, c.unet.cfg.addition_time_embed_dim)
    else:
        context, y = t1.last, None
    x = torch.randn(1, 4, 8, 8, generator=g).to(dtype)
    out["unet"] = c.unet(x, torch.tensor([500]), context.to(dtype), y)
    img = torch.rand(1, 3, 16, 16, generator=g).to(dtype) * 2 - 1
    out["vae.mean"] = c.vae.encode(img).mean
    out["vae.decode"] = c.vae.decode(torch.randn(1, 4, 2, 2, generator=g).to(dtype))
    return out


def test_family_table():
    assert set(FAMILIES) == {"sdxl", "sd15", "sdxl-tiny", "sd15-tiny", "sdxl-micro"}
    xl, sd = FAMILIES["sdxl"], FAMILIES["sd15"]
    assert xl.prefixes == {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "te1": "conditioner.embedders.0.transformer.",
        "te2": "conditioner.embedders.1.model.",
    }
    assert sd.prefixes == {
        "unet": "model.diffusion_model.",
        "vae": "first_stage_model.",
        "te1": "cond_stage_model.transformer.",
    }
    assert (xl.base_model_version, sd.base_model_version) == ("sdxl_base_v1-0", "sd_v1")
    assert xl.prediction == sd.prediction == "epsilon"
    assert sd.te2 is None and FAMILIES["sd15-tiny"].te2 is None
    assert FAMILIES["sd15-tiny"].vae.scaling_factor == 0.18215
    assert FAMILIES["sdxl-tiny"].vae.scaling_factor == 0.13025


def test_real_sdxl_key_count():
    """The meta-built SDXL parts have exactly the 2,513 loadable tensors of sd_xl_base_1.0
    (2,515 minus position_ids and logit_scale, which IGNORED covers)."""
    fam = FAMILIES["sdxl"]
    counts = {p: len(fam.build(p, "meta").state_dict()) for p in fam.parts}
    assert counts == {"unet": 1680, "vae": 248, "te1": 196, "te2": 389}
    assert checkpoint.ignored("conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "sdxl")
    assert checkpoint.ignored("conditioner.embedders.1.model.logit_scale", "sdxl")


@pytest.mark.parametrize("fam", TINY)
def test_roundtrip_save_detect_load(tiny_files, fam):
    comps, path = tiny_files[fam]
    with WeightLoader(path) as w:
        assert detect(w).name == fam
        n_expected = sum(len(m.state_dict()) for _, m in comps.items())
        assert len(w) == n_expected
    loaded = load(path)
    assert loaded.family.name == fam
    for part, m in comps.items():
        m2 = getattr(loaded, part)
        assert type(m2) is type(m)
        sd, sd2 = m.state_dict(), m2.state_dict()
        assert list(sd) == list(sd2)
        assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    with torch.no_grad():
        ref, got = _outputs(comps), _outputs(loaded)
    for k in ref:
        assert torch.equal(ref[k], got[k]), (k, (ref[k] - got[k]).abs().max().item())
        assert ref[k].abs().max() > 0  # outputs are non-trivial


def test_load_dtype_device_parts_frozen(tiny_files):
    comps, path = tiny_files["sdxl-tiny"]
    c = load(path, dtype=torch.bfloat16, device="cpu", parts=("unet", "te2"))
    assert c.vae is None and c.te1 is None
    for part in ("unet", "te2"):
        m, ref = getattr(c, part), getattr(comps, part).state_dict()
        assert not m.training
        for k, t in m.state_dict().items():
            assert t.dtype == torch.bfloat16 and t.device.type == "cpu", k
            assert torch.equal(t, ref[k].to(torch.bfloat16)), k
        assert not any(p.requires_grad for p in m.parameters())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_load_equals_reading_one_tensor_at_a_time(tiny_files, tmp_path, dtype):
    """load() (parallel read_many) gives exactly what WeightLoader.tensor() gives one by one: same
    values, dtype, device, contiguous and 64-byte aligned, for an fp32 and an fp16 file."""
    comps, path32 = tiny_files["sdxl-tiny"]
    path16 = save(comps, tmp_path / "fp16.safetensors", dtype=torch.float16)
    for path in (path32, path16):
        c = load(path, dtype=dtype)
        with WeightLoader(path) as w:
            for part, m in c.items():
                prefix = c.family.prefixes[part]
                for k, t in m.state_dict().items():
                    want = dtype if t.is_floating_point() else None
                    ref = w.tensor(prefix + k, t.shape, dtype=want)
                    assert t.dtype == ref.dtype and t.device == ref.device, k
                    assert t.is_contiguous() and t.data_ptr() % 64 == 0, k
                    assert torch.equal(t, ref), k


def test_load_stages_through_small_buffers(tiny_files, monkeypatch):
    """The fp32 -> bf16 cast goes through per-worker host buffers of at most _CHUNK bytes (here
    64 KiB, so large tensors take several chunks), not a full fp32 state dict, and gives the
    right values."""
    comps, path = tiny_files["sdxl-tiny"]
    monkeypatch.setattr(weights, "_CHUNK", 1 << 16)
    buffers = []
    real = weights._host_buffer
    monkeypatch.setattr(weights, "_host_buffer", lambda n, pinned: buffers.append((n, pinned)) or real(n, pinned))
    c = load(path, dtype=torch.bfloat16)
    with WeightLoader(path) as w:
        total = w.nbytes
        largest = max(w.shape(k).numel() * 4 for k in w.keys())
    assert largest > 1 << 16  # the chunked path ran
    assert 1 <= len(buffers) <= 8 and all(n <= 1 << 16 and not pinned for n, pinned in buffers)
    assert sum(n for n, _ in buffers) < total / 10
    for part, m in c.items():
        ref = getattr(comps, part).state_dict()
        assert all(torch.equal(t, ref[k].to(torch.bfloat16)) for k, t in m.state_dict().items()), part


def test_sd15_file_where_sdxl_was_asked(tiny_files):
    _, path = tiny_files["sd15-tiny"]
    with pytest.raises(FamilyMismatch) as e:
        load(path, family="sdxl-tiny")
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg
    assert "is an SD1.5 checkpoint (sd15-tiny), but sdxl-tiny was asked" in msg
    with pytest.raises(FamilyMismatch):
        load(path, family="sdxl")


def test_lora_file_is_not_a_base_model(tmp_path):
    lora = {}
    for name in ("lora_unet_input_blocks_4_1_proj_in", "lora_te1_text_model_encoder_layers_0_mlp_fc1"):
        lora[f"{name}.lora_down.weight"] = torch.zeros(4, 8)
        lora[f"{name}.lora_up.weight"] = torch.zeros(8, 4)
        lora[f"{name}.alpha"] = torch.tensor(4.0)
    path = _write(tmp_path / "style.safetensors", lora)
    with pytest.raises(NotAModel) as e:
        load(path)
    assert str(e.value) == f"{path}: is a LoRA file (2 modules), not a base model; pass it with --lora"
    assert isinstance(e.value, WeightError)


def _fake_unet_keys(channels, context, adm, in_channels=4):
    """Only the keys `detect` reads, as int8 so real-size shapes stay small."""
    sd = {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(channels, in_channels, 3, 3, dtype=torch.int8),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(
            8, context, dtype=torch.int8
        ),
    }
    if adm:
        sd["model.diffusion_model.label_emb.0.0.weight"] = torch.zeros(8, adm, dtype=torch.int8)
    return sd


@pytest.mark.parametrize(
    "shapes, expect",
    [
        ((320, 2048, 2816), "sdxl"),
        ((320, 768, None), "sd15"),
        ((32, 96, 256), "sdxl-tiny"),
        ((32, 32, None), "sd15-tiny"),
        ((320, 1024, None), "context dim 1024 = SD2.x, unsupported"),
        ((384, 1280, 2560), "SDXL refiner"),
        ((320, 768, None, 9), "9 input channels = an inpainting/instruct model"),
        ((64, 512, None), "unknown architecture"),
    ],
)
def test_detect_from_shapes(tmp_path, shapes, expect):
    path = _write(tmp_path / "m.safetensors", _fake_unet_keys(*shapes))
    with WeightLoader(path) as w:
        if expect in FAMILIES:
            assert detect(w).name == expect
        else:
            with pytest.raises(NotAModel) as e:
                detect(w)
            assert expect in str(e.value) and "\n" not in str(e.value)
            assert "eridiffusion trains SDXL and SD1.5 base checkpoints" in str(e.value)


@pytest.mark.parametrize(
    "keys, expect",
    [
        (["encoder.conv_in.weight", "decoder.conv_in.weight"], "is a standalone VAE"),
        (["conv_in.weight", "down_blocks.0.resnets.0.conv1.weight"], "is a diffusers-layout UNet"),
        (["unet.down_blocks.0.attn1.to_q.lora_A.weight"], "is a diffusers/peft LoRA file"),
        (["foo.weight", "bar.bias"], "has no model.diffusion_model.input_blocks.0.0.weight (2 tensors under bar, foo)"),
    ],
)
def test_detect_unknown_files_say_what_they_are(tmp_path, keys, expect):
    path = _write(tmp_path / "x.safetensors", {k: torch.zeros(1) for k in keys})
    with WeightLoader(path) as w, pytest.raises(NotAModel, match=expect.replace("(", r"\(").replace(")", r"\)")):
        detect(w)


def test_missing_key_is_named(tiny_files, tmp_path):
    _, path = tiny_files["sdxl-tiny"]
    state = _state(path)
    gone = "model.diffusion_model.out.2.weight"
    del state[gone]
    bad = _write(tmp_path / "bad.safetensors", state)
    with pytest.raises(KeyMismatch) as e:
        load(bad)
    msg = str(e.value)
    assert "\n" not in msg and f"unet keys do not match the model: 1 missing ({gone})" in msg
    assert e.value.missing == [gone]


def test_unexpected_keys_are_named(tiny_files, tmp_path):
    _, path = tiny_files["sdxl-tiny"]
    state = _state(path)
    state["model.diffusion_model.out.3.weight"] = torch.zeros(1)
    bad = _write(tmp_path / "bad.safetensors", state)
    with pytest.raises(KeyMismatch, match=r"1 unexpected \(model.diffusion_model.out.3.weight\)"):
        load(bad)
    state = _state(path)
    state["some_trainer_step"] = torch.zeros(1)
    bad = _write(tmp_path / "bad2.safetensors", state)
    with pytest.raises(KeyMismatch, match=r"file keys .* 1 unexpected \(some_trainer_step\)"):
        load(bad)


def test_ignored_keys_load(tiny_files, tmp_path):
    comps, path = tiny_files["sdxl-tiny"]
    state = _state(path)
    junk = [
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids",
        "conditioner.embedders.1.model.logit_scale",
        "alphas_cumprod",
        "betas",
        "model_ema.decay",
        "cond_stage_model.transformer.text_model.final_layer_norm.weight",
    ]
    for k in junk:
        state[k] = torch.zeros(1)
    c = load(_write(tmp_path / "junk.safetensors", state))
    assert torch.equal(c.unet.out[2].weight, comps.unet.out[2].weight)
    # cond_stage_model.* is junk only in an SDXL file: in SD1.5 it is the text encoder's prefix
    _, sd15 = tiny_files["sd15-tiny"]
    state = _state(sd15)
    state["cond_stage_model.transformer.text_model.junk"] = torch.zeros(1)
    with pytest.raises(KeyMismatch, match="te1 keys .* unexpected"):
        load(_write(tmp_path / "junk15.safetensors", state))


def test_wrong_shape_is_named(tiny_files, tmp_path):
    _, path = tiny_files["sd15-tiny"]
    state = _state(path)
    key = "first_stage_model.quant_conv.weight"
    state[key] = torch.zeros(8, 8, 1, 2)
    with pytest.raises(ShapeMismatch) as e:
        load(_write(tmp_path / "bad.safetensors", state))
    assert e.value.key == key and e.value.found == [8, 8, 1, 2] and e.value.expected == [8, 8, 1, 1]


def test_absent_part(tiny_files, tmp_path):
    _, path = tiny_files["sdxl-tiny"]
    state = {k: v for k, v in _state(path).items() if not k.startswith("conditioner.embedders.1.")}
    bad = _write(tmp_path / "no_te2.safetensors", state)
    with pytest.raises(KeyMismatch, match=r"te2 keys .* missing \(all \d+ keys under conditioner.embedders.1.model.\)"):
        load(bad)
    assert load(bad, parts=("te1",)).te2 is None


def test_pickle_checkpoint(tiny_files, tmp_path):
    comps, path = tiny_files["sd15-tiny"]
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": _state(path), "global_step": 10}, ckpt)
    with pytest.raises(PickleRefused):
        load(ckpt)
    c = load(ckpt, allow_pickle=True, parts=("te1",))
    assert c.family.name == "sd15-tiny"
    assert torch.equal(c.te1.state_dict()["text_model.final_layer_norm.weight"],
                       comps.te1.state_dict()["text_model.final_layer_norm.weight"])


def test_save_is_atomic_and_casts(tiny_files, tmp_path):
    comps, _ = tiny_files["sd15-tiny"]
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    save(comps, path, dtype=torch.float16)
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]  # temp file renamed away
    with WeightLoader(path) as w:
        assert w.dtype("model.diffusion_model.out.2.weight") == torch.float16
        assert w.metadata == {"format": "pt"}
        assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for k in w)


def test_tiny_components_seeded():
    a, b, c = tiny_components("sdxl-tiny", 0), tiny_components("sdxl-tiny", 0), tiny_components("sdxl-tiny", 1)
    wa, wb, wc = (x.unet.out[2].weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.te2 is not None and tiny_components("sd15-tiny").te2 is None
    with pytest.raises(ValueError, match="not tiny"):
        tiny_components("sdxl")


@pytest.mark.gpu
def test_load_to_cuda_bf16(tiny_files):
    comps, path = tiny_files["sdxl-tiny"]
    c = load(path, dtype=torch.bfloat16, device="cuda")
    for part, m in c.items():
        ref = getattr(comps, part).state_dict()
        for k, t in m.state_dict().items():
            assert t.is_cuda and t.dtype == torch.bfloat16, k
            assert torch.equal(t.cpu(), ref[k].to(torch.bfloat16)), k
    with torch.no_grad():
        x = torch.randn(1, 4, 8, 8, device="cuda")
        ids = torch.full((1, 77), 49407, device="cuda")
        ctx = torch.cat([c.te1(ids).hidden, c.te2(ids).hidden], dim=-1)
        y = torch.randn(1, 256, device="cuda")
        out = c.unet(x, torch.tensor([500], device="cuda"), ctx, y)
    assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.gpu
def test_load_to_cuda_equals_cpu_load(tiny_files, tmp_path):
    """The CUDA path (pinned buffers, cast on the GPU) gives what the CPU path gives, moved over."""
    comps, path32 = tiny_files["sdxl-tiny"]
    path16 = save(comps, tmp_path / "fp16.safetensors", dtype=torch.float16)
    for path in (path32, path16):
        for dtype in (torch.bfloat16, torch.float32):
            gpu, cpu = load(path, dtype=dtype, device="cuda"), load(path, dtype=dtype, device="cpu")
            for part, m in gpu.items():
                ref = getattr(cpu, part).state_dict()
                for k, t in m.state_dict().items():
                    assert t.is_cuda and t.dtype == ref[k].dtype and t.is_contiguous(), k
                    assert torch.equal(t.cpu(), ref[k]), k
