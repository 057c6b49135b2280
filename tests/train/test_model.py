import pytest
import timm
import torch
from safetensors.torch import save_file

from timm_fmd.train import TrainConfig
from timm_fmd.train.model import base_architecture, create_model, pretrained_source


def test_base_architecture():
    assert base_architecture('fmd_resnet50.a1_in1k') == 'resnet50'
    assert base_architecture('cifar_resnet20') == 'cifar_resnet20'


def test_pretrained_file_loads_the_backbone_and_resets_the_head(tmp_path):
    source = timm.create_model('test_efficientnet', num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / 'w.safetensors'))
    cfg = TrainConfig(model='test_efficientnet', pretrained=str(tmp_path / 'w.safetensors'))
    model = create_model(cfg, num_classes=3, steps_per_epoch=1)
    assert model.get_classifier().out_features == 3
    state, expected = model.state_dict(), source.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items() if not k.startswith('classifier.'))
    same = create_model(TrainConfig(model='test_efficientnet', pretrained=str(tmp_path / 'w.safetensors')), 1000, 1)
    assert torch.equal(same.get_classifier().weight, source.get_classifier().weight)  # kept when it fits
    assert pretrained_source(cfg, model) == str(tmp_path / 'w.safetensors')
    assert create_model(cfg, 3, 1, pretrained=False) is not None


def test_pretrained_errors(tmp_path):
    torch.save({'state_dict': timm.create_model('test_vit').state_dict()}, tmp_path / 'vit.pth')
    with pytest.raises(ValueError, match=r'vit.pth does not fit .*missing keys'):
        create_model(TrainConfig(model='test_efficientnet', pretrained=str(tmp_path / 'vit.pth')), 3, 1)
    (tmp_path / 'junk.pth').write_bytes(b'junk')
    with pytest.raises(ValueError, match='cannot read weights from'):
        create_model(TrainConfig(model='test_efficientnet', pretrained=str(tmp_path / 'junk.pth')), 3, 1)
    with pytest.raises(ValueError, match="--pretrained: 'nothing_here' is not a file"):
        create_model(TrainConfig(model='test_efficientnet', pretrained='nothing_here'), 3, 1)
