"""Write the notebooks in this folder from the cell sources below (outputs are not committed).

    python notebooks/build_notebooks.py
"""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent


def md(s):
    return nbf.v4.new_markdown_cell(s.strip())


def code(s):
    return nbf.v4.new_code_cell(s.strip())


QUICKSTART = [
    md("""
# MARS quickstart on the built-in model organism

The organism is a ~0.8M-parameter LLaVA (`LlavaForConditionalGeneration`) trained by this
package on CPU: it refuses harmful *text* requests but mostly answers the same request when the
harmful object arrives as an *image* (the safety gap). We extract a refusal direction from
text only, and steer image requests with it: naively (ActAdd) and with MARS.
"""),
    code("""
import torch
torch.set_num_threads(2)
import matplotlib.pyplot as plt
import numpy as np

from mars_core import load_model, RefusalDirections
from mars_core.organism import load_organism
from mars_core.steering import MARS, ActAdd, NoSteer, fit_mars
from analysis.suite import organism_suite
from mars_core.steering import neutral_calibration

mm = load_model(*load_organism("natural"))
suite = organism_suite(seed=0)
mm
"""),
    md("Every prompt set is a `PromptSet`: texts, optional images, a harmful flag and a content hash."),
    code("""
for name, ps in suite.items():
    print(f"{name:20s} {len(ps):4d} {ps.modality:5s} e.g. {ps.texts[0]!r}")
fig, axes = plt.subplots(1, 4, figsize=(6, 1.8))
for ax, name in zip(axes, ["harmful_image", "harmful_image", "harmless_image", "neutral_image"]):
    i = 0 if ax is axes[0] else 40 if name == "harmful_image" else 0
    ax.imshow(suite[name].images[i]); ax.set_axis_off()
    ax.set_title(suite[name].meta.get("concepts", ["neutral"] * 99)[i] or "neutral", fontsize=8)
"""),
    md("""
## 1. A refusal direction from text only
Difference of means of the residual stream (harmful minus harmless text requests) at every
layer and every post-instruction position, accumulated in float64 through nnsight.
"""),
    code("""
dirs = RefusalDirections.extract(mm, suite["harmful_text_train"].texts, suite["harmless_text_train"].texts)
print(dirs)
print("post-instruction tokens:", mm.build_batch(["How do I make a cake ?"]).post_tokens)
"""),
    md("""
## 2. Do image requests carry the text direction?
Project the last-position activation of held-out image requests onto the text direction at
each layer: harmful images should sit above harmless ones although no image was used to make
the direction.
"""),
    code("""
from mars_core import collect_activations

def projections(ps):
    acts = collect_activations(mm, ps.texts, images=ps.images, positions="last", reduce="none")["acts"]
    r = np.stack([dirs.direction(l, -1).numpy() for l in range(mm.n_layers)])  # [layer, d_model]
    return np.einsum("pld,ld->pl", acts.sel(pos=-1).values, r)

ph, ps_ = projections(suite["harmful_image"]), projections(suite["harmless_image"])
fig, ax = plt.subplots(figsize=(3.4, 2.4))
for proj, lab in ((ph, "harmful image"), (ps_, "harmless image")):
    m, s = proj.mean(0), proj.std(0)
    ax.errorbar(np.arange(mm.n_layers), m, yerr=s, capsize=3, label=lab)
ax.set_xlabel("layer"); ax.set_ylabel("projection on text direction (residual units)"); ax.legend(fontsize=7)
fig.tight_layout()
"""),
    md("""
## 3. Steering image requests
MARS needs the modality offset, measured on *neutral* inputs only (benign requests with blank,
solid-colour and noise images). `fit_mars` then picks its layer from harmful *text* plus
neutral images, and fits its gate (threshold, gain, trust-region margin) on *safe* prompts
only: the most permissive gate that adds at most 5 points of first-token refusal to harmless
text, harmless image requests and caption prompts. The fitted operator saves as one folder.
"""),
    code("""
calib = neutral_calibration(mm, dirs, suite["neutral_text"], {"image": suite["neutral_image"]})
safe = {n: suite[n] for n in ("harmless_text_train", "harmless_image_cal", "captions_cal")}
mars = fit_mars(mm, calib, suite["harmful_text"].texts[:32], safe, neutral={"image": suite["neutral_image"]})
print(mars)
print("layer with the initial gate:", mars.fit_info["layer_with_initial_gate"], "-> fitted:", mars.layer, mars.gate)
mars.save("mars_organism")                       # mars.json + calibration.safetensors + selection datasets
mars = MARS.load("mars_organism", model=mm)      # the same operator, bit for bit
layer = mars.layer

methods = {"none": NoSteer(), "actadd": ActAdd.from_directions(dirs, layer, 1.0), "mars": mars}
h = suite["harmful_image"].subset(range(0, 96, 24)); s = suite["harmless_image"].subset(range(0, 96, 24))
for name, st in methods.items():
    gh = st.generate(mm, h.texts, images=h.images, max_new_tokens=8)
    gs = st.generate(mm, s.texts, images=s.images, max_new_tokens=8)
    print(f"{name:7s} harmful: {list(gh)}\\n        harmless: {list(gs)}")
"""),
    md("""
## 4. The same operator inside your own nnsight block
`apply` edits the last prompt position at prefill only (the first generated token) and can
record the per-row strength it applied.
"""),
    code("""
import nnsight

batch = mm.build_batch(h.texts, images=h.images)
with torch.no_grad():
    with mm.nn.generate(max_new_tokens=8, do_sample=False) as tracer:
        with tracer.invoke(batch.inputs):
            rec = nnsight.save({})
            mars.apply(mm, batch, record=rec)
        with tracer.invoke():
            ids = nnsight.save(tracer.result)
print("alpha per row:", rec["alpha"])
print(mm.tokenizer.batch_decode(ids[:, batch.seq_len:], skip_special_tokens=True))
"""),
]

FINDINGS = [
    md("""
# The paper's findings, from the analysis datasets

This notebook runs `mars reproduce`'s pipeline (quick sizes, cached under `OUT`) on the built-in
organism and reads every analysis back as a labeled `xarray.Dataset`. Numbers below are computed
from the datasets, not typed in.
"""),
    code("""
import os, tempfile
from pathlib import Path
import torch
torch.set_num_threads(2)
from IPython.display import Image, Markdown, display

from analysis.reproduce import Settings, organism_study, run
from mars_core.datasets import load_dataset

OUT = Path(os.environ.get("MARS_NOTEBOOK_OUT", Path(tempfile.gettempdir()) / "mars_findings"))
study = organism_study(OUT, settings=Settings.quick(), log=lambda m: None)
written = run(study, progress=False)
data = {p.stem: load_dataset(p) for p in sorted((OUT / "data").glob("*.nc"))}
sorted(data)
"""),
    md("## Text directions align with image requests, and the modality offset"),
    code("""
al = data["alignment"]
display(al[["cos_direction", "cos_offset", "offset_projection_ratio", "auc"]].to_dataframe().round(3))
display(Image(str(OUT / "figures" / "alignment.png")))
"""),
    md("## Naive steering vs MARS: refusal against strength"),
    code("""
cv = data["refusal_curves"]
print("selected layer:", cv.attrs["layer"])
rate = cv["refused"].sel(layer=cv.attrs["layer"]).mean("prompt")
display(rate.to_dataframe().unstack("strength").round(2))
display(Image(str(OUT / "figures" / "refusal_curves.png")))
"""),
    md("## Spurious refusal of safe images, with and without re-centering"),
    code("""
sp = data["spurious_refusal"]
display(sp["refused"].mean("prompt").to_dataframe().unstack("strength").round(2))
print("share of safe images the gate opens for:", sp["gate_open"].mean("prompt").values.round(3))
display(Image(str(OUT / "figures" / "spurious.png")))
"""),
    md("## Direction stability across training checkpoints"),
    code("""
st = data["stability"]
display(st["cosine"].mean("layer").to_pandas().round(3))
display(Image(str(OUT / "figures" / "stability.png")))
"""),
    md("## Method comparison (95% bootstrap CIs)"),
    code("""
display(Markdown((OUT / "figures" / "comparison.md").read_text()))
display(Image(str(OUT / "figures" / "comparison.png")))
"""),
]

NDIF = [
    md("""
# The same code on an NDIF-hosted model (`remote=True`)

Not executed in CI (needs network and an NDIF API key). Set `NDIF_API_KEY` in the environment.
`load_model(..., remote=True)` hands the key to nnsight's in-memory config (this package never
writes it to disk or prints it) and makes every trace of the model run on NDIF, including the
traces of code that never mentions `remote` (the calibration below). Interventions run on the
server; only values saved with `nnsight.save` come back; the package's code is sent by value with
each request. See `docs/ndif.md`.
"""),
    code("""
import os
assert "NDIF_API_KEY" in os.environ, "export NDIF_API_KEY first"

from mars_core import load_model, RefusalDirections
from mars_core.steering import fit_mars, media_side, neutral_calibration
from analysis.suite import typographic_suite

MODEL = "llava-hf/llava-1.5-7b-hf"   # a supported family that NDIF hosts (see nnsight.status())
mm = load_model(MODEL, remote=True)  # meta weights locally; every trace runs on NDIF
suite = typographic_suite(seed=0, image_size=media_side(mm, default=224))
"""),
    code("""
dirs = RefusalDirections.extract(mm, suite["harmful_text_train"].texts[:64], suite["harmless_text_train"].texts[:64])
calib = neutral_calibration(mm, dirs, suite["neutral_text"], {"image": suite["neutral_image"]})
safe = {n: suite[n] for n in ("harmless_text_train", "harmless_image_cal", "captions")}
mars = fit_mars(mm, calib, suite["harmful_text"].texts, safe, neutral={"image": suite["neutral_image"]})
mars.save("runs/llava15_mars")   # reuse with MARS.load("runs/llava15_mars", model=mm) or `mars steer --mars`
h = suite["harmful_image"].subset(range(4))
print(mars.generate(mm, h.texts, images=h.images, max_new_tokens=32))
"""),
    md("The full pipeline: `mars reproduce --model llava-hf/llava-1.5-7b-hf --remote --out runs/llava`. "
       "Dry run of the same requests in this process: `load_model(..., remote=\"local\")`, `--remote local`."),
]


def write(name, cells):
    nb = nbf.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbf.write(nb, HERE / name)


if __name__ == "__main__":
    write("01_quickstart.ipynb", QUICKSTART)
    write("02_findings.ipynb", FINDINGS)
    write("03_ndif_remote.ipynb", NDIF)
