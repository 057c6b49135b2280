import argparse
import ast
import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from timm_fmd import FMDSettings
from timm_fmd.train.config import (DIGITS_RECIPE, TrainConfig, add_arguments, config_from_args, config_from_dict,
                                   fmd_kwargs, load_yaml, merge, resolved_lr, save_config, validate)

CONFIGS = Path(__file__).resolve().parents[2] / 'configs'


def parse(*argv: str) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(argv)))


# The TrainConfig defaults before the digits recipe moved out of them: a bare `timm-fmd train` still gets them.
DIGITS_AS_BEFORE = dict(img_size=32, crop_pct=1.0, train_crop_mode='pad', crop_pad=2, hflip=0.0, rotate=10.0, lr=0.1,
                        fmd_prob=0.1, fmd_block_size=3, fmd_stages=[-1], fmd_sites=['conv'], fmd_gamma=30.0,
                        fmd_ramp_epochs=2.0)


def test_bare_command_line_trains_the_digits_recipe_exactly_as_before():
    cfg = parse()
    assert cfg == TrainConfig(**DIGITS_AS_BEFORE)  # every other field kept its default
    assert cfg == config_from_dict(load_yaml(DIGITS_RECIPE)) == config_from_dict(load_yaml(CONFIGS / 'digits.yaml'))
    assert parse('--epochs', '3') == TrainConfig(**DIGITS_AS_BEFORE, epochs=3)  # options still override it
    assert DIGITS_RECIPE.parent.name == 'data' and DIGITS_RECIPE.parent.parent.name == 'timm_fmd'  # shipped inside


def test_a_data_dir_run_takes_the_model_and_registry_defaults(tmp_path):
    cfg = parse('--data-dir', str(tmp_path), '--model', 'fmd_resnet18')
    assert cfg == TrainConfig(data_dir=str(tmp_path), model='fmd_resnet18')
    assert (cfg.img_size, cfg.crop_pct, cfg.mean, cfg.std, cfg.interpolation) == (None,) * 5  # the model's own
    assert (cfg.train_crop_mode, cfg.hflip, cfg.rotate, cfg.lr) == ('rrc', 0.5, 0.0, None)  # timm's train.py
    assert fmd_kwargs(cfg, steps_per_epoch=10) == {}
    assert FMDSettings.from_kwargs(fmd_kwargs(cfg, steps_per_epoch=10)) == FMDSettings()  # the registry's


def test_learning_rate_rule_is_timms():
    """timm's train.py: lr_base 0.1 at a global batch of 256, linear for SGD, square root for ada*/lamb."""
    assert resolved_lr(TrainConfig(batch_size=64)) == pytest.approx(0.025)
    assert resolved_lr(TrainConfig(batch_size=64, grad_accum_steps=2), world_size=2) == pytest.approx(0.1)
    assert resolved_lr(TrainConfig(batch_size=64, opt='adamw')) == pytest.approx(0.05)  # 0.1 * sqrt(1/4)
    assert resolved_lr(TrainConfig(batch_size=64, opt='lamb')) == pytest.approx(0.05)
    assert resolved_lr(TrainConfig(lr=0.3)) == 0.3


def test_help_shows_one_set_of_defaults(capsys):
    parser = argparse.ArgumentParser(prog='timm-fmd train')
    add_arguments(parser)
    parser.print_help()
    text = ' '.join(capsys.readouterr().out.split())
    img_size = "--img-size IMG_SIZE input image size (square); none = the model's pretrained_cfg input size"
    assert f'{img_size} (default: none)' in text
    for option, registry in (('--fmd-prob', '0.1'), ('--fmd-block-size', '7'), ('--fmd-stages', '-2 -1'),
                             ('--fmd-sites', 'conv skip'), ('--fmd-gamma', '1.0'), ('--fmd-mode', 'approx')):
        part = text[text.rindex(option + ' '):]  # the option's help, after the usage lines
        assert part.split('(default: ', 1)[1].startswith(f"none = the registry's: {registry})"), option
    assert '--no-no-aug' not in text and "--aug undo a recipe's --no-aug" in text


def test_no_aug_flags(tmp_path):
    (tmp_path / 'r.yaml').write_text('no_aug: true\n')
    assert parse('-c', str(tmp_path / 'r.yaml')).no_aug is True
    assert parse('-c', str(tmp_path / 'r.yaml'), '--aug').no_aug is False
    assert parse('--no-aug').no_aug is True


def test_readme_registry_table_states_the_registry_defaults():
    """The docs' table of fmd_* defaults is FMDSettings'."""
    readme = (CONFIGS.parent / 'README.md').read_text()
    rows = [line.split('|')[1:3] for line in readme.splitlines() if line.startswith('| `fmd_')]
    defaults = FMDSettings()
    checked = 0
    for names, values in rows:
        names = re.findall(r'`fmd_(\w+)`', names)
        for name, value in zip(names, values.split(', ') if len(names) > 1 else [values]):
            if name == 'input_size':
                continue  # "model's"
            assert ast.literal_eval(value.strip()) == getattr(defaults, name), name
            checked += 1
    assert checked == 11


@pytest.mark.parametrize('path', sorted(CONFIGS.glob('*.yaml')), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_validates(path):
    cfg = config_from_dict(load_yaml(path))
    if path.name.endswith('_baseline.yaml'):
        assert not cfg.model.startswith('fmd_')
    elif path.name != 'digits.yaml':
        assert cfg.model.startswith('fmd_') and cfg.data_dir is not None


def test_paper_table2_recipe():
    cfg = config_from_dict(load_yaml(CONFIGS / 'cifar10_resnet56_bfmd.yaml'))
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.momentum) == (200, 128, 0.1, 5e-4, 0.9)
    assert (cfg.sched, cfg.decay_milestones, cfg.decay_rate) == ('multistep', [60, 120, 160], 0.2)
    assert (cfg.warmup_epochs, cfg.warmup_lr, cfg.opt_kwargs) == (1, 0.0, {'filter_bias_and_bn': False})  # release
    assert (cfg.train_crop_mode, cfg.crop_pad, cfg.hflip, cfg.rotate) == ('pad', 4, 0.5, 15.0)
    assert (cfg.fmd_block_size, cfg.fmd_gamma, cfg.fmd_stages, cfg.fmd_sites) == (6, 30.0, [-1], ['conv'])
    assert 0.01 <= cfg.fmd_prob <= 0.1
    baseline = config_from_dict(load_yaml(CONFIGS / 'cifar10_resnet56_baseline.yaml'))
    assert baseline.model_kwargs['drop_block_rate'] == 0.05
    assert dataclasses.replace(baseline, model=cfg.model, model_kwargs={}) == cfg  # only the regulariser differs


def test_base_chain_and_override(tmp_path):
    (tmp_path / 'a.yaml').write_text('epochs: 7\nlr: 0.5\n')
    (tmp_path / 'b.yaml').write_text('base: a.yaml\nlr: 0.2\n')
    assert load_yaml(tmp_path / 'b.yaml') == {'epochs': 7, 'lr': 0.2}
    (tmp_path / 'c.yaml').write_text('base: c.yaml\n')
    with pytest.raises(ValueError, match='cycle'):
        load_yaml(tmp_path / 'c.yaml')


def test_yaml_errors_name_the_problem(tmp_path):
    (tmp_path / 'bad.yaml').write_text('epocs: 3\n')
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['epocs'\]"):
        load_yaml(tmp_path / 'bad.yaml')
    (tmp_path / 'list.yaml').write_text('- 1\n')
    with pytest.raises(ValueError, match='expected a mapping'):
        load_yaml(tmp_path / 'list.yaml')
    with pytest.raises(FileNotFoundError, match='missing.yaml'):
        load_yaml(tmp_path / 'missing.yaml')


@pytest.mark.parametrize('overrides, message', [
    ({'epochs': 0}, '--epochs: got 0'),
    ({'epochs': 2.5}, '--epochs must be an integer'),
    ({'lr': 'fast'}, '--lr must be a number'),
    ({'lr': -1}, '--lr: got -1.0'),
    ({'hflip': 1.5}, '--hflip: got 1.5, expected a probability'),
    ({'sched': 'linear'}, "--sched: got 'linear', expected one of"),
    ({'opt': 'nope'}, "--opt: got 'nope'"),
    ({'amp': 'maybe'}, '--amp must be true or false'),
    ({'decay_milestones': [100, 50]}, '--decay-milestones'),
    ({'fmd_prob': 1.0}, '--fmd-prob: got 1.0'),
    ({'fmd_sites': ['conv', 'fc']}, '--fmd-sites'),
    ({'fmd_stage_scale': [0.5]}, '--fmd-stage-scale'),
    ({'lr': 0}, '--lr: got 0.0, expected a number > 0 or none'),
    ({'model_kwargs': {'fmd_prob': 0.1}}, '--model-kwargs'),
    ({'mixup': 0.2, 'batch_size': 7}, 'even batch size'),
    ({'model_ema_decay': 1.0}, '--model-ema-decay'),
])
def test_validation_errors_name_the_option(overrides, message):
    with pytest.raises(ValueError, match=message.replace('(', r'\(').replace('[', r'\[')):
        validate(merge(TrainConfig(), overrides))


def test_unknown_override():
    with pytest.raises(ValueError, match=r"unknown setting\(s\) \['nope'\]"):
        merge(TrainConfig(), {'nope': 1})


def test_save_config_round_trip():
    cfg = merge(TrainConfig(), {'model_kwargs': {'drop_rate': 0.2}, 'fmd_stages': [-1], 'fmd_stage_scale': [0.25],
                                'pretrained': 'x.pt'})
    assert config_from_dict(yaml.safe_load(save_config(cfg))) == cfg


def test_command_line_overrides_yaml_overrides_defaults(tmp_path):
    (tmp_path / 'r.yaml').write_text('epochs: 7\nlr: 0.5\nbatch_size: 32\n')
    cfg = parse('-c', str(tmp_path / 'r.yaml'), '--lr', '1e-3', '-b', '16', '--amp', '--decay-milestones', '3', '9',
                '--model-kwargs', 'drop_rate=0.25', 'global_pool=max', '--fmd-stages', '-2', '-1', '--pretrained')
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.amp, cfg.decay_milestones) == (7, 1e-3, 16, True, [3, 9])
    assert cfg.model_kwargs == {'drop_rate': 0.25, 'global_pool': 'max'}
    assert cfg.fmd_stages == [-2, -1] and cfg.pretrained is True
    assert parse('--no-sched-on-updates', '--fmd-gamma', 'none').fmd_gamma is None
    assert parse('--pretrained', 'hf-hub:timm/x').pretrained == 'hf-hub:timm/x'
    assert parse('--torchcompile').torchcompile == 'inductor'
    assert parse('--experiment', '007').experiment == '007'  # strings stay strings


def test_command_line_errors():
    with pytest.raises(ValueError, match='--fmd-prob: Feature Map Distortion needs an fmd_<arch> model'):
        parse('--model', 'resnet18', '--fmd-prob', '0.2')
    with pytest.raises(ValueError, match='k=v'):
        parse('--model-kwargs', 'drop_rate')
    with pytest.raises(SystemExit):
        parse('--sched', 'linear')  # argparse choices


def test_resume_takes_the_run_config(tmp_path):
    run = tmp_path / 'run'
    run.mkdir()
    (run / 'config.yaml').write_text(save_config(merge(TrainConfig(), {'epochs': 3, 'lr': 0.3})))
    cfg = parse('--resume', str(run), '--epochs', '5')
    assert (cfg.epochs, cfg.lr, cfg.resume) == (5, 0.3, str(run))
    with pytest.raises(ValueError, match='--config: not with --resume'):
        parse('--resume', str(run), '-c', str(run / 'config.yaml'))


def test_fmd_kwargs_convert_the_ramp_to_steps():
    cfg = merge(TrainConfig(), {'fmd_ramp_epochs': 2.5, 'fmd_lam': None, 'fmd_stages': [-1], 'fmd_stage_scale': [1.0]})
    kwargs = fmd_kwargs(cfg, steps_per_epoch=10)
    assert kwargs == dict(fmd_stages=(-1,), fmd_stage_scale=(1.0,), fmd_ramp_steps=25)
    with pytest.raises(ValueError, match=r'--fmd-stage-scale: .*one multiplier per --fmd-stages entry \(\[-2, -1\]\)'):
        validate(merge(TrainConfig(), {'fmd_stage_scale': [1.0]}))  # the registry's two stages
