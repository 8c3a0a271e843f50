"""Text-to-image pipeline, `eri sample` and validation grids on the tiny models (CPU).

Reproducibility is checked bit for bit (same settings → same pixels and PNG bytes; a PNG's
own metadata renders it again), the conditioning against hand-computed references (zero
uncond, SDXL time_ids sinusoids), and LoRA strength against the base model.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from eridiffusion import checkpoint, cli, networks, pipeline
from eridiffusion.config import SampleConfig, TrainConfig
from eridiffusion.pipeline import Pipeline, SampleParams, Validation

SIZE = (64, 32)  # (width, height): non-square, so a swapped axis would show
FAST = dict(steps=3, cfg=5.0, size=SIZE)



@pytest.fixture(scope="module")
def sdxl():
    return Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory):
    """A random rank-4 LoRA on the tiny SDXL UNet and both text encoders (kohya file)."""
    c = checkpoint.tiny_components("sdxl-tiny", seed=0)
    nets = [networks.inject(c.unet, "unet", 4, 4.0), networks.inject(c.te1, "te1", 4, 4.0), networks.inject(c.te2, "te2", 4, 4.0)]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for net in nets:
            for p in net.lora_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    networks.save_lora(path, nets, dtype=torch.float32)
    return path


# -- determinism --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sdxl-tiny", "sd15-tiny"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "euler_a"])
def test_same_seed_same_bytes_other_seed_differs(family, sampler):
    pipe = Pipeline(checkpoint.tiny_components(family, seed=0))
    a = pipe("a red circle", sampler=sampler, seed=7, **FAST)[0]
    b = pipe("a red circle", sampler=sampler, seed=7, **FAST)[0]
    c = pipe("a red circle", sampler=sampler, seed=8, **FAST)[0]
    assert a.size == SIZE and a.mode == "RGB"
    assert png_bytes(a) == png_bytes(b)
    assert pixels(a).std() > 10  # a real image, not a saturated or flat one
    assert np.abs(pixels(a) - pixels(c)).mean() > 5


def test_batch_seeds_follow_seed_plus_k(sdxl):
    """Image k of a batch gets seed + k: it matches the same seed rendered alone (batched CPU
    kernels may differ in the last bits, so within one 8-bit level)."""
    batch = sdxl(["a cat", "a dog"], seed=3, batch=2, **FAST)
    assert len(batch) == 4
    alone = sdxl("a dog", seed=5, **FAST)[0]  # prompt 1, image 0: k = 2, seed 3 + 2
    assert np.abs(pixels(batch[2]) - pixels(alone)).max() <= 1
    assert np.abs(pixels(batch[2]) - pixels(batch[3])).mean() > 5


# -- conditioning -------------------------------------------------------------------------------
def test_sdxl_uncond_zero_for_empty_negative_and_encoded_otherwise(sdxl):
    cond, uncond = sdxl.encode(["a cat", "a dog"], "")
    assert cond["context"].shape == (2, 77, 96) and cond["pooled"].shape == (2, 64)
    assert all(torch.count_nonzero(v) == 0 for v in uncond.values())
    _, neg = sdxl.encode(["a cat", "a dog"], "blurry")
    ref = sdxl.encode_text(["blurry"])
    for k in ("context", "pooled"):
        assert torch.equal(neg[k][1], ref[k][0])
    # context = cat(CLIP-L penultimate, bigG penultimate); pooled = bigG pooled
    enc = sdxl.text_encoder  # the family's (families/sdxl.py)
    ids1 = torch.tensor([[49406, *enc.tok1.encode("a cat"), 49407] + [49407] * 73])
    ids2 = torch.tensor([[49406, *enc.tok2.encode("a cat"), 49407] + [0] * 73])
    o1, o2 = enc.te1(ids1), enc.te2(ids2)
    assert torch.equal(cond["context"][0], torch.cat([o1.hidden[0], o2.hidden[0]], dim=-1))
    assert torch.equal(cond["pooled"][0], o2.pooled[0])


def test_sd15_uncond_is_the_encoded_empty_string():
    pipe = Pipeline(checkpoint.tiny_components("sd15-tiny", seed=0))
    cond, uncond = pipe.encode(["a cat"], "")
    assert set(cond) == {"context"} and cond["context"].shape == (1, 77, 32)
    enc = pipe.text_encoder  # the family's (families/sd.py)
    assert torch.equal(uncond["context"], enc.te1(enc.tok1([""])).last)


def test_sdxl_time_ids_vector(sdxl):
    """y = [pooled, sinusoid(h), sinusoid(w), sin(0), sin(0), sinusoid(h), sinusoid(w)] with
    ldm's [cos, sin] layout, computed here from the formula."""
    text = sdxl.encode_text(["a cat"])
    y = sdxl.unet_inputs(text, (64, 32))["y"]
    dim = sdxl.family.unet.addition_time_embed_dim
    half = dim // 2
    rows = []
    for v in (32, 64, 0, 0, 32, 64):  # height first
        freqs = [math.exp(-math.log(10000) * i / half) for i in range(half)]
        rows += [math.cos(v * f) for f in freqs] + [math.sin(v * f) for f in freqs]
    assert torch.equal(y[0, :64], text["pooled"][0])
    torch.testing.assert_close(y[0, 64:], torch.tensor(rows), atol=1e-5, rtol=0)


def test_bad_size_and_sampler_are_one_line_errors(sdxl):
    with pytest.raises(pipeline.PipelineError, match=r"size 60x32 .* multiples of 32"):
        sdxl("a", size=(60, 32))
    with pytest.raises(pipeline.PipelineError, match="sampler 'heun' is unknown"):
        sdxl("a", sampler="heun", size=SIZE)


# -- LoRA ---------------------------------------------------------------------------------------
def test_lora_scale_zero_is_base_scale_one_differs(lora_file):
    base = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0))("a cat", seed=1, **FAST)[0]
    zero = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0), loras=[(lora_file, 0.0)])
    one = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0), loras=[(lora_file, 1.0)])
    assert set(one.networks) == {"unet", "te1", "te2"}
    assert png_bytes(zero("a cat", seed=1, **FAST)[0]) == png_bytes(base)
    styled = one("a cat", seed=1, **FAST)[0]
    assert np.abs(pixels(styled) - pixels(base)).mean() > 5
    one.remove_loras()
    assert png_bytes(one("a cat", seed=1, **FAST)[0]) == png_bytes(base)


def test_several_loras_and_merged_equal_wrapped(lora_file):
    """Two files at 0.5 each equal one at 1.0, and folding into the weights equals wrapping:
    text outputs and UNet outputs agree to fp32 rounding, which the random tiny UNet under a
    strong random LoRA amplifies ~1000× (in float64 the halves agree to 1e-13); sampled images
    are chaotic in such rounding, so the network outputs are compared."""
    wrapped = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0), loras=[(lora_file, 1.0)])
    halves = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0), loras=[(lora_file, 0.5), (lora_file, 0.5)])
    merged = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0), loras=[(lora_file, 1.0)], merge_loras=True)
    base = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0))
    x = torch.randn(2, 4, 4, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([999.0, 500.0])

    def outputs(pipe: Pipeline) -> list[torch.Tensor]:
        with torch.no_grad():
            cond, _ = pipe.encode(["a cat", "a dog"])
            return [cond["context"], cond["pooled"], pipe.unet(x, t, **pipe.unet_inputs(cond, SIZE))]

    ref = outputs(wrapped)
    for pipe in (halves, merged):
        for a, b in zip(outputs(pipe), ref):
            torch.testing.assert_close(a, b, atol=1e-3, rtol=0)  # measured ≤ 2.7e-4 (UNet), LoRA effect > 0.1
    assert all((a - b).abs().max() > 0.1 for a, b in zip(outputs(base), ref))  # the LoRA matters


# -- PNG metadata and eri sample ----------------------------------------------------------------
def test_a1111_parameters_text():
    p = SampleParams("a cat", "blurry", 42, "dpmpp_2m", True, 25, 6.5, (832, 1216), "sd_xl_base_1.0.safetensors",
                     "31e35c80fc", "sdxl", "bf16", (("style.safetensors", "0123456789", 0.8),))  # fmt: skip
    assert p.a1111() == (
        "a cat <lora:style:0.8>\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 42, Size: 832x1216, "
        'Model hash: 31e35c80fc, Model: sd_xl_base_1.0, Lora hashes: "style: 0123456789", '
        f"Version: eridiffusion {pipeline.__version__}"
    )
    assert SampleParams.from_json(json.loads(json.dumps(p.to_json()))) == p


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny_sdxl.safetensors"
    checkpoint.save(checkpoint.tiny_components("sdxl-tiny", seed=0), path)
    return path


def test_eri_sample_writes_numbered_pngs_that_reproduce(tiny_ckpt, lora_file, tmp_path):
    out = tmp_path / "out"
    argv = ["sample", "--model", str(tiny_ckpt), "--lora", f"{lora_file}:0.7", "--prompt", "a red circle",
            "--prompt", "a blue square", "--negative", "blurry", "--batch", "2", "--steps", "3", "--cfg", "4.5",
            "--sampler", "euler_a", "--karras", "--seed", "10", "--size", "64x32", "--out", str(out),
            "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000-10.png", "00001-11.png", "00002-12.png", "00003-13.png"]
    assert cli.main(argv[:-4] + ["--out", str(out), "--device", "cpu"]) == 0  # same call: new numbers
    assert len(list(out.iterdir())) == 8 and (out / "00007-13.png").is_file()

    with Image.open(out / "00003-13.png") as im:
        saved, text = pixels(im.convert("RGB")), dict(im.text)
    meta = json.loads(text["eridiffusion"])
    assert meta["prompt"] == "a blue square" and meta["seed"] == 13 and meta["size"] == [64, 32]
    assert meta["sampler"] == "euler_a" and meta["karras"] is True and meta["negative"] == "blurry"
    assert meta["model"] == {"file": "tiny_sdxl.safetensors", "sha256": pipeline.sha256_prefix(tiny_ckpt),
                             "family": "sdxl-tiny"}  # fmt: skip
    assert meta["loras"] == [{"file": "style.safetensors", "sha256": pipeline.sha256_prefix(lora_file), "scale": 0.7}]
    assert text["parameters"].startswith("a blue square <lora:style:0.7>\nNegative prompt: blurry\nSteps: 3, ")

    # rebuild the call from the metadata alone: same pixels
    p = pipeline.read_params(out / "00003-13.png")
    loras = [(lora_file.parent / name, scale) for name, _, scale in p.loras]
    pipe = Pipeline.from_checkpoint(tiny_ckpt.parent / p.model, dtype=pipeline.DTYPES[p.dtype], loras=loras)
    again = pipe(p.prompt, p.negative, p.steps, p.cfg, p.sampler, p.karras, p.seed, p.size)[0]
    assert np.array_equal(pixels(again), saved)


def test_eri_sample_compile_renders_the_eager_images(tiny_ckpt, tmp_path, monkeypatch):
    """`--compile` compiles the UNet regions and the VAE decoder (dynamo with the eager backend
    here: the same ops, so the same pixels) and renders what the plain call renders."""
    compiled, original = [], Pipeline.compile

    def eager_compile(self, backend="inductor"):
        compiled.append(original(self, backend="eager"))
        return compiled[-1]

    monkeypatch.setattr(Pipeline, "compile", eager_compile)
    base = ["sample", "--model", str(tiny_ckpt), "--prompt", "a red circle", "--batch", "2", "--steps", "3",
            "--size", "64x32", "--device", "cpu"]  # fmt: skip
    assert cli.main(base + ["--out", str(tmp_path / "plain")]) == 0 and not compiled
    assert cli.main(base + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    (pipe,) = compiled
    assert pipe.vae.decoder._compiled_call_impl is not None
    assert any(getattr(m._forward, "_torchdynamo_orig_callable", None) for m in pipe.unet.modules() if hasattr(m, "_forward"))
    for name in ("00000-0.png", "00001-1.png"):
        with Image.open(tmp_path / "plain" / name) as a, Image.open(tmp_path / "compiled" / name) as b:
            assert np.array_equal(pixels(a.convert("RGB")), pixels(b.convert("RGB")))


def test_eri_sample_errors_are_one_line(tiny_ckpt, tmp_path, capsys):
    base = ["sample", "--model", str(tiny_ckpt), "--prompt", "a", "--out", str(tmp_path), "--device", "cpu"]
    assert cli.main(base + ["--size", "60x64"]) == 2
    assert cli.main(base + ["--lora", str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "60x64" in err[0] and "missing.safetensors: file not found" in err[1]
    assert not list(tmp_path.glob("*.png"))


def test_parse_helpers():
    assert pipeline.parse_size("832x1216") == (832, 1216) and pipeline.parse_size("512") == (512, 512)
    assert pipeline.parse_lora("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert pipeline.parse_lora(r"C:\loras\b.safetensors") == (r"C:\loras\b.safetensors", 1.0)
    with pytest.raises(pipeline.PipelineError, match="WIDTHxHEIGHT"):
        pipeline.parse_size("big")


# -- validation grids ---------------------------------------------------------------------------
class FakeWriter:
    def __init__(self):
        self.images = []

    def add_image(self, tag, image, step, dataformats):
        self.images.append((tag, image.shape, step, dataformats))


def test_validation_grid_size_deterministic_and_side_effect_free(tmp_path):
    c = checkpoint.tiny_components("sdxl-tiny", seed=0)
    cfg = SampleConfig(prompts=("a red circle", "a blue square", "a green cross"), seeds=(1, 2), steps=3,
                       cfg=5.0, sampler="euler_a", size=(64, 32))  # fmt: skip
    val = Validation(c, cfg, tmp_path, encode_now=True)
    c.te1 = c.te2 = c.vae = None  # what the trainer frees after caching
    c.unet.train()
    rng = torch.get_rng_state()
    writer = FakeWriter()
    first, second = val(5, writer), val(10)
    assert first == tmp_path / "samples" / "step000005.png" and second.name == "step000010.png"
    assert c.unet.training and torch.equal(torch.get_rng_state(), rng)
    assert writer.images == [("samples", (3 * 32, 2 * 64, 3), 5, "HWC")]
    with Image.open(first) as a, Image.open(second) as b:
        assert a.size == (2 * 64, 3 * 32)  # columns = seeds, rows = prompts
        grid_a, grid_b = pixels(a.convert("RGB")), pixels(b.convert("RGB"))
        assert json.loads(a.text["eridiffusion"])["seeds"] == [1, 2]
    assert np.array_equal(grid_a, grid_b)
    # the cell of prompt 1, seed 2 is that image rendered by the pipeline itself
    cell = Pipeline(checkpoint.tiny_components("sdxl-tiny", seed=0))("a blue square", sampler="euler_a", seed=2, **FAST)[0]
    assert np.abs(grid_a[32:64, 64:128] - pixels(cell)).max() <= 1


def test_training_writes_validation_grids(tmp_path):
    from eridiffusion.tiny.demo import demo_config, prepare
    from eridiffusion.train import train

    prepare(tmp_path, n_images=2, log=lambda _: None)
    cfg = demo_config(tmp_path, steps=3)
    cfg = cfg.replace(sample={"every_n_steps": 2, "steps": 2, "seeds": [0], "size": [64, 64]},
                      data={"resolution": 64, "bucket_min": 64, "bucket_max": 64}, train={"batch_size": 1})  # fmt: skip
    assert isinstance(cfg, TrainConfig)
    train(cfg, log=lambda _: None, progress=False)
    grids = sorted(p.name for p in (tmp_path / "samples").iterdir())
    assert grids == ["step000002.png", "step000003.png"]  # every 2 steps and at the end
    with Image.open(tmp_path / "samples" / "step000003.png") as im:
        assert im.width == 64 and im.height > 64  # labelled: the prompt above, the seed below (train/previews.py)


@pytest.mark.gpu
def test_cuda_bf16_starts_from_the_cpu_noise_and_is_deterministic():
    """On CUDA in bf16 a seed starts from the same latents as on the CPU (noise drawn on the CPU)
    and gives the same image twice; the image is finite (bf16 VAE)."""
    starts = {}

    def render(device: str, dtype: torch.dtype) -> Image.Image:
        c = checkpoint.tiny_components("sdxl-tiny", seed=0)
        for _, m in c.items():
            m.to(device, dtype)
        pipe = Pipeline(c)
        cond, uncond = pipe.encode(["a cat"])

        def keep(d):
            if d["i"] == 0:
                starts[device] = d["x"].float().cpu()

        return pipe.generate(cond, uncond, [4], steps=4, size=SIZE, callback=keep)[0]

    render("cpu", torch.float32)
    a, b = render("cuda", torch.bfloat16), render("cuda", torch.bfloat16)
    torch.testing.assert_close(starts["cuda"], starts["cpu"], atol=1e-6, rtol=0)
    assert png_bytes(a) == png_bytes(b) and pixels(a).std() > 10
