"""Model cards for trained runs, written from the run's own files (see the run directory contract).

The card follows the layout of timm's cards on the Hugging Face Hub: YAML front matter (tags, library, license,
metrics; with a Hub dataset id also ``datasets`` and a ``model-index`` of the measured results, rounded to
0.01), then Model Details (parameters, GMACs and activations counted on the model itself, the data set, the
classes), Intended Use and Limitations, Model Usage (timm snippets), Training (data, schedule, hardware, time,
recipe and FMD settings), Results (measured accuracy and train-val gap, optionally beside a baseline run, and
``curves.png``) and Citation. Every number comes from ``results.json``, ``config.yaml`` or the checkpoint; a
run without validation says so instead. The card is written from the published (path-free) files only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from torch import nn

from .stats import model_stats

__all__ = ['RunRecord', 'read_run', 'evaluated_metrics', 'model_card']

TAGS = ['image-classification', 'timm', 'feature-map-distortion']
RESULTS_KEYS = ('model', 'architecture', 'pretrained', 'num_classes', 'label_names', 'model_kwargs', 'fmd', 'data',
                'epochs', 'global_steps', 'batch_size', 'seed', 'best', 'final', 'train_val_gap', 'checkpoint')
FMD_CITATION = """@inproceedings{tang2020beyond,
  title={Beyond Dropout: Feature Map Distortion to Regularize Deep Neural Networks},
  author={Tang, Yehui and Wang, Yunhe and Xu, Yixing and Shi, Boxin and Xu, Chao and Xu, Chunjing and Xu, Chang},
  booktitle={Proceedings of the AAAI Conference on Artificial Intelligence},
  volume={34}, number={04}, pages={5964--5971},
  year={2020},
  doi={10.1609/aaai.v34i04.6057},
  eprint={2002.11022}, archivePrefix={arXiv}
}"""
TIMM_CITATION = """@misc{rw2019timm,
  author = {Ross Wightman},
  title = {PyTorch Image Models},
  year = {2019},
  publisher = {GitHub},
  journal = {GitHub repository},
  doi = {10.5281/zenodo.4414861},
  howpublished = {\\url{https://github.com/huggingface/pytorch-image-models}}
}"""
EXAMPLE_IMAGE = 'https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/beignets-task-guide.png'


@dataclass(frozen=True)
class RunRecord:
    """A finished training run: its directory, the checkpoint to publish, and its parsed files.

    ``weights`` is the checkpoint's name in the run (``best.safetensors`` or ``last.safetensors``): it says
    which results describe the published weights, also when they come from a published folder."""
    run_dir: Path
    checkpoint: Path
    results: dict[str, Any]
    config_text: str
    weights: str


def read_run(source: str | os.PathLike) -> RunRecord:
    """Read a RUN_DIR, a ``.safetensors`` checkpoint inside one (``RUN_DIR/checkpoints/*.safetensors``), or a
    repository folder ``save_pretrained`` wrote (to publish it again, e.g. with a newer card).

    A directory publishes the checkpoint named by ``results.json["checkpoint"]``.
    """
    path = Path(source)
    if path.is_dir() and (path / 'train_config.yaml').is_file() and (path / 'model.safetensors').is_file():
        results = _read_results(path)
        return RunRecord(path, path / 'model.safetensors', results, (path / 'train_config.yaml').read_text(),
                         Path(results['checkpoint']).name)
    if path.is_file():
        if path.suffix != '.safetensors':
            raise ValueError(f'source must be a run directory or a .safetensors checkpoint in one, got {str(path)!r}')
        run_dir = path.parent.parent if path.parent.name == 'checkpoints' else path.parent
    elif path.is_dir():
        run_dir = path
    else:
        raise ValueError(f'source {str(path)!r} does not exist')
    missing = [n for n in ('results.json', 'config.yaml') if not (run_dir / n).is_file()]
    if missing:
        advice = (f'; finish it first: `timm-fmd train --resume {run_dir}`'
                  if (run_dir / 'checkpoints' / 'last.state.pt').is_file() else '')
        raise ValueError(f'{str(run_dir)!r} is not a finished training run: it has no {" or ".join(missing)}{advice}')
    results = _read_results(run_dir)
    checkpoint = path if path.is_file() else run_dir / results['checkpoint']
    if not checkpoint.is_file():
        raise ValueError(f'checkpoint {str(checkpoint)!r} named by results.json does not exist')
    return RunRecord(run_dir, checkpoint, results, (run_dir / 'config.yaml').read_text(), checkpoint.name)


def _read_results(folder: Path) -> dict[str, Any]:
    results = json.loads((folder / 'results.json').read_text())
    missing = [k for k in RESULTS_KEYS if k not in results]
    if missing:
        raise ValueError(f'{folder / "results.json"} lacks the keys {missing} of the run directory contract')
    return results


def evaluated_metrics(run: RunRecord) -> dict[str, Any] | None:
    """Validation metrics of exactly the weights published: ``best`` for best.safetensors, ``final`` for
    last.safetensors. None when those weights were not evaluated (no validation, or another checkpoint)."""
    by_file = {'best.safetensors': run.results['best'], 'last.safetensors': run.results['final']}
    record = by_file.get(run.weights)
    if not record or record.get('val_top1') is None:
        return None
    return {k: record.get(k) for k in ('epoch', 'val_top1', 'val_top5', 'val_loss')}


def _feature_shapes(run: RunRecord) -> list[tuple[int, ...]] | None:
    """Output shapes of ``timm.create_model(architecture, features_only=True)`` for one image, or None when the
    architecture does not support feature extraction."""
    r = run.results
    try:
        extractor = timm.create_model(r['architecture'], features_only=True, **r['model_kwargs']).eval()
        with torch.no_grad():
            return [tuple(o.shape) for o in extractor(torch.zeros(1, *r['data']['input_size']))]
    except (AssertionError, NotImplementedError, RuntimeError, TypeError, ValueError):
        return None


def _data_text(data_name: str, dataset: str | None) -> str:
    """The data set in words, from the published (path-free) results: a Hub data set is linked."""
    if dataset:
        return f'[{dataset}](https://huggingface.co/datasets/{dataset})'
    if data_name == 'digits':
        return 'the UCI handwritten digits embedded in timm-fmd (`digits`)'
    return data_name  # privacy.LOCAL_DATA: a local image folder, not published


def _fmt(value: Any, spec: str | None = '.2f') -> str:
    if value is None:
        return '–'
    return format(float(value), spec) if spec and isinstance(value, (int, float)) else str(value)


def _eval_results(metrics: dict, dataset: str, split: str) -> list[EvalResult]:
    return [EvalResult(task_type='image-classification', dataset_type=dataset, dataset_name=dataset,
                       dataset_split=split, metric_type='accuracy', metric_name=f'Top-{k} accuracy (%)',
                       metric_config=f'top{k}', metric_value=round(metrics[f'val_top{k}'], 2))
            for k in (1, 5) if metrics.get(f'val_top{k}') is not None]


def _registering_package(architecture: str) -> str | None:
    """The top-level package that registers ``architecture`` in timm, when it is not timm itself."""
    package = timm.models.model_entrypoint(architecture).__module__.split('.')[0]
    return None if package == 'timm' else package


def _usage(model_id: str, model: nn.Module, stats: dict, feature_shapes: list | None, register: str) -> str:
    head = f"""from urllib.request import urlopen
from PIL import Image
import timm
import torch
{register}
img = Image.open(urlopen('{EXAMPLE_IMAGE}')).convert('RGB')  # 8-bit RGB, as in training
"""
    transforms = """model = model.eval()

# get model specific transforms (normalization, resize)
data_config = timm.data.resolve_model_data_config(model)
transforms = timm.data.create_transform(**data_config, is_training=False)
"""
    k = min(5, model.num_classes)
    text = f"""### Image Classification
```python
{head}
model = timm.create_model('{model_id}', pretrained=True)
{transforms}
output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1
top{k}_probabilities, top{k}_class_indices = torch.topk(output.softmax(dim=1) * 100, k={k})
labels = model.pretrained_cfg['label_names']  # class-folder names, in class-index order
```
"""
    if feature_shapes:
        shapes = '\n'.join(f'    #  torch.Size({list(shape)})' for shape in feature_shapes)
        text += f"""
### Feature Map Extraction
```python
{head}
model = timm.create_model('{model_id}', pretrained=True, features_only=True)
{transforms}
output = model(transforms(img).unsqueeze(0))  # unsqueeze single image into batch of 1

for o in output:
    # print shape of each feature map in output
    # e.g.:
{shapes}
    print(o.shape)
```
"""
    text += f"""
### Image Embeddings
```python
{head}
model = timm.create_model('{model_id}', pretrained=True, num_classes=0)  # remove classifier nn.Linear
{transforms}
output = model(transforms(img).unsqueeze(0))  # output is (batch_size, num_features) shaped tensor

# or equivalently (without needing to set num_classes=0)

output = model.forward_features(transforms(img).unsqueeze(0))
# output is unpooled, a {stats['features_shape']} shaped tensor

output = model.forward_head(output, pre_logits=True)
# output is a (1, num_features) shaped tensor
```
"""
    return text


def _hardware(results: dict) -> str:
    hw = results.get('hardware')
    if not hw:
        return 'not recorded (the run predates timm-fmd recording it)'
    kind = 'GPU' if hw['device'] == 'cuda' else hw['device'].upper()
    return f"{hw['processes']} x {kind} ({hw['name']}), {hw['threads']} torch CPU thread(s) per process"


def _duration(results: dict) -> str:
    wall = results.get('wall_time_s')
    if wall is None:
        return 'not recorded'
    rate = results.get('images_per_sec')
    return f"{wall / 60:.1f} min ({wall:.0f} s) wall clock" + (f', {rate:.0f} images/s while training' if rate else '')


def _training(run: RunRecord, data_text: str) -> str:
    r, data = run.results, run.results['data']
    lines = [
        f"- **Data:** {data_text}: {data.get('train_size')} training images, {data.get('val_size')} validation "
        f"images (split: {data.get('val_split')}), {r['num_classes']} classes, input {tuple(data['input_size'])}",
        f"- **Schedule:** {r['epochs']} epochs, {r['global_steps']} optimiser steps, batch size {r['batch_size']}, "
        f"seed {r['seed']}",
        f"- **Initialisation:** {r['pretrained'] or 'random (trained from scratch)'}",
        f"- **Published weights:** `{run.weights}` ({r.get('evaluated_weights', 'model')} weights)",
        f"- **Training hardware:** {_hardware(r)}",
        f"- **Training time:** {_duration(r)}",
    ]
    if r.get('versions'):
        lines.append('- **Software:** ' + ', '.join(f'{k} {v}' for k, v in r['versions'].items()))
    text = '\n'.join(lines) + '\n\n'
    if r['fmd']:
        text += ('Feature Map Distortion settings (`fmd_*` arguments of `timm_fmd.create_model`; '
                 '`config.json` keeps them under `fmd`):\n\n| setting | value |\n|---|---|\n')
        text += ''.join(f'| `fmd_{k}` | {json.dumps(v)} |\n' for k, v in r['fmd'].items())
    else:
        text += 'This run was trained **without** Feature Map Distortion (a baseline).\n'
    return text + f'\n<details><summary>Full training configuration (train_config.yaml)</summary>\n\n```yaml\n' \
                  f'{run.config_text.rstrip()}\n```\n</details>\n'


def _classes(label_names: list[str]) -> str:
    names = ', '.join(f'`{n}`' for n in label_names)
    if len(label_names) <= 20:
        return f'- **Classes ({len(label_names)}, in output order):** {names}'
    return (f'- **Classes ({len(label_names)}, in output order):** <details><summary>show</summary>\n\n  {names}\n'
            f'  </details>')


def _intended_use(run: RunRecord, data_text: str) -> str:
    r, data = run.results, run.results['data']
    n, (_, h, w) = r['num_classes'], data['input_size']
    split = ('a validation split carved from its training images' if data.get('val_split') == 'carved'
             else f"the {data.get('val_split')} split")
    return f"""- **Intended use:** classifying images like those it was trained on into the {n} classes above, at
  {h} x {w} through the model's own transforms (see Model Usage); or as a backbone to fine-tune.
- **Out of scope:** images of other classes (there is no "none of these" output: every image gets one of the {n}
  classes), and decisions with consequences for people: the model was not evaluated for them.
- **Limitations:** its accuracy was measured on {data.get('val_size')} images of {split} of the same data; images
  from another source (camera, resolution, subject, class balance) can give much lower accuracy. Inputs are 8-bit
  RGB as timm's transforms expect; images of more than 8 bits per sample or float images must be scaled as in
  training (`timm_fmd.train.images.load_rgb`), not clipped by `convert('RGB')`.
"""


def _results(run: RunRecord, baseline: RunRecord | None) -> str:
    runs = [('this model', run)] + ([('baseline', baseline)] if baseline else [])
    metrics = [evaluated_metrics(r) for _, r in runs]
    if metrics[0] is None:
        return (f'The published weights (`{run.weights}`) have no validation evaluation in this run\'s '
                'results.json, so no accuracy is reported.\n')
    rows = [
        ('FMD', [('yes' if r.results['fmd'] else 'no') for _, r in runs]),
        ('Evaluated epoch', [_fmt(m and m['epoch'], None) for m in metrics]),
        ('Top-1 accuracy (%)', [_fmt(m and m['val_top1']) for m in metrics]),
        ('Top-5 accuracy (%)', [_fmt(m and m['val_top5']) for m in metrics]),
        ('Validation loss', [_fmt(m and m['val_loss'], '.4f') for m in metrics]),
        ('Final train top-1 (%)', [_fmt(r.results['final'].get('train_top1')) for _, r in runs]),
        ('Final train-val gap (pp)', [_fmt(r.results['train_val_gap']) for _, r in runs]),
    ]
    split = run.results['data'].get('val_split')
    text = (f'Measured on the {split} split during training (results.json); the train-val gap is final train top-1 '
            'minus final validation top-1.\n\n')
    text += '| | ' + ' | '.join(name for name, _ in runs) + ' |\n' + '|---' * (len(runs) + 1) + '|\n'
    text += ''.join(f'| {label} | ' + ' | '.join(values) + ' |\n' for label, values in rows)
    return text + ('\n![Top-1 accuracy and loss per epoch, training dashed, validation solid](curves.png)\n\n'
                   'Top-1 accuracy and loss per epoch (`curves.png`; the numbers are in `metrics.csv`).\n')


def model_card(run: RunRecord, model: nn.Module, model_id: str, *, license: str = 'apache-2.0',
               baseline: RunRecord | None = None, dataset: str | None = None) -> ModelCard:
    """The model card of ``run`` (its published, path-free files), whose weights are loaded in ``model``.

    Args:
        run: The run being published (``read_run``, with the results and config as published).
        model: The base timm model holding the published weights (for parameter/MAC/activation counts).
        model_id: How users load it, e.g. ``hf-hub:ORG/NAME`` or ``local-dir:/path``.
        license: The Hub license id for the front matter.
        baseline: A run to report beside this one (e.g. the same recipe without FMD).
        dataset: The Hub dataset id of the data. Only with it does the front matter list a data set and
            carry a ``model-index`` (whose dataset must be a Hub id); the numbers are in the card either way.
    """
    r, data = run.results, run.results['data']
    data_text = _data_text(data['name'], dataset)
    input_size = tuple(data['input_size'])
    stats = model_stats(model, input_size)
    name = model_id.split(':', 1)[1].split('@')[0] if model_id.startswith('hf-hub:') else r['architecture']
    metrics = evaluated_metrics(run)
    pretrained = r['pretrained']
    base_model = (pretrained.removeprefix('hf-hub:').split('@')[0] if pretrained and pretrained.startswith('hf-hub:')
                  else None)
    card_data = ModelCardData(
        library_name='timm', license=license, tags=TAGS, pipeline_tag='image-classification',
        datasets=[dataset] if dataset else None, metrics=['accuracy'], base_model=base_model,
        model_name=name if metrics and dataset else None,  # the model-index's name; nothing without one
        eval_results=_eval_results(metrics, dataset, data.get('val_split')) if metrics and dataset else None)
    regularizer = 'Feature Map Distortion (FMD)' if r['fmd'] else 'no Feature Map Distortion (a baseline)'
    package = _registering_package(r['architecture'])
    needs = f' (`import {package}` registers the architecture in timm)' if package else ''
    register = f'import {package}  # registers {r["architecture"]} in timm\n' if package else ''
    text = f"""---
{card_data.to_yaml()}
---
# Model card for {name}

A `{r['architecture']}` image classification model trained on {data_text} with {regularizer}, using
timm-fmd on top of timm. The weights are those of the plain `{r['architecture']}` architecture: FMD distorts
feature maps only while training, so inference needs no FMD code{needs}.

## Model Details
- **Model Type:** Image classification / feature backbone
- **Model Stats:**
  - Params (M): {stats['params_m']:.3g}
  - GMACs: {stats['gmacs']:.3g}
  - Activations (M): {stats['activations_m']:.3g}
  - Image size: {input_size[1]} x {input_size[2]}
- **Dataset:** {data_text}
{_classes(r['label_names'])}
- **Papers:**
  - Beyond Dropout: Feature Map Distortion to Regularize Deep Neural Networks: https://arxiv.org/abs/2002.11022
- **Original:** https://github.com/huggingface/pytorch-image-models

## Intended Use and Limitations
{_intended_use(run, data_text)}
## Model Usage
{_usage(model_id, model, stats, _feature_shapes(run), register)}
## Training
{_training(run, data_text)}
## Results
{_results(run, baseline)}
## Citation
```bibtex
{FMD_CITATION}
```
```bibtex
{TIMM_CITATION}
```
"""
    card = ModelCard(text)
    if (card.data.eval_results or []) != (card_data.eval_results or []):
        raise RuntimeError(f'the card front matter does not parse back to its model-index: {card.data.eval_results}')
    return card
