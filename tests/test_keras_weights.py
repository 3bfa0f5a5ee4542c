"""Keras Applications .h5 weights in timm models (lt_timm.models.keras_applications, lt_timm.models.nasnet).

No network and no Keras: each test writes a synthetic weights file in the layout of Keras's ``save_weights``
(``layer_names`` / ``weight_names`` attributes, one dataset per weight, channels-last kernels) with the layer names
of ``keras/src/applications/{mobilenet_v2,nasnet}.py``. The file's layers come from :class:`KerasReference`, an
independent transcription of those two Keras builders in torch's functional ops (Keras's own padding rules:
``correct_pad`` + "valid", TensorFlow "same", average pools that exclude the padding), which creates each layer's
random weights on first use. The model loaded from the file through timm's doors must compute what the reference
computes from the same weights: a layer mapped to the wrong module, a wrong transpose, a wrong wiring or padding
changes the output.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

h5py = pytest.importorskip('h5py')
import timm  # noqa: E402
import lt_timm.models  # noqa: F401,E402  (registers nasnetamobile, tf_mobilenetv2_100)
from lt_timm.modeling import create_model  # noqa: E402


def correct_pad(n, k):
    """keras.applications.imagenet_utils.correct_pad for one dimension of size n."""
    adjust = 1 - n % 2
    return k // 2 - adjust, k // 2


def tf_same(n, k, s):
    """TensorFlow's "same" padding (before, after) for one dimension."""
    total = max((-(-n // s) - 1) * s + k - n, 0)
    return total // 2, total - total // 2


class KerasReference:
    """Keras layers in NCHW float64, creating Keras-shaped weights (``{layer: {weight: array}}``) on first use."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.weights = {}

    def _layer(self, name, shapes):
        if name not in self.weights:
            made = {}
            for key, shape in shapes.items():
                if key in ('kernel', 'depthwise_kernel', 'pointwise_kernel'):
                    fan_in = int(np.prod(shape[:-1])) if key != 'depthwise_kernel' else shape[0] * shape[1]
                    made[key] = self.rng.normal(0, np.sqrt(2.0 / fan_in), shape)
                elif key in ('gamma', 'moving_variance'):
                    made[key] = self.rng.uniform(0.7, 1.3, shape)
                else:  # beta, moving_mean, bias
                    made[key] = self.rng.normal(0, 0.1, shape)
            self.weights[name] = {k: v.astype(np.float32) for k, v in made.items()}
        return {k: torch.from_numpy(v.astype(np.float64)) for k, v in self.weights[name].items()}

    @staticmethod
    def pad(x, pads_hw, value=0.):
        (t, b), (l, r) = pads_hw
        return F.pad(x, (l, r, t, b), value=value)

    def same(self, x, k, s):
        return self.pad(x, (tf_same(x.shape[2], k, s), tf_same(x.shape[3], k, s)))

    def conv(self, x, name, filters, k=1, stride=1, padding='same'):
        w = self._layer(name, {'kernel': (k, k, x.shape[1], filters)})['kernel']
        x = self.same(x, k, stride) if padding == 'same' else x
        return F.conv2d(x, w.permute(3, 2, 0, 1), stride=stride)

    def depthwise(self, x, name, k, stride, padding):
        w = self._layer(name, {'depthwise_kernel': (k, k, x.shape[1], 1)})['depthwise_kernel']
        x = self.same(x, k, stride) if padding == 'same' else x
        return F.conv2d(x, w.permute(2, 3, 0, 1), stride=stride, groups=x.shape[1])

    def separable(self, x, name, filters, k, stride, padding):
        w = self._layer(name, {'depthwise_kernel': (k, k, x.shape[1], 1), 'pointwise_kernel': (1, 1, x.shape[1],
                                                                                              filters)})
        x = self.same(x, k, stride) if padding == 'same' else x
        x = F.conv2d(x, w['depthwise_kernel'].permute(2, 3, 0, 1), stride=stride, groups=x.shape[1])
        return F.conv2d(x, w['pointwise_kernel'].permute(3, 2, 0, 1))

    def bn(self, x, name):
        c = x.shape[1]
        w = self._layer(name, {'gamma': (c,), 'beta': (c,), 'moving_mean': (c,), 'moving_variance': (c,)})
        shape = (1, c, 1, 1)
        return ((x - w['moving_mean'].view(shape)) / torch.sqrt(w['moving_variance'].view(shape) + 1e-3)
                * w['gamma'].view(shape) + w['beta'].view(shape))

    def dense(self, x, name, units):
        w = self._layer(name, {'kernel': (x.shape[1], units), 'bias': (units,)})
        return x @ w['kernel'] + w['bias']

    def zero_pad(self, x, k):
        return self.pad(x, (correct_pad(x.shape[2], k), correct_pad(x.shape[3], k)))

    @staticmethod
    def avg_same(x):  # AveragePooling2D(3, strides 1, "same"): TensorFlow leaves the padding out of the mean
        return F.avg_pool2d(x, 3, 1, padding=1, count_include_pad=False)

    # ---- keras/src/applications/mobilenet_v2.py ----
    def mobilenet_v2(self, x, classes=1000):
        x = F.relu6(self.bn(self.conv(x, 'Conv1', 32, 3, 2), 'bn_Conv1'))
        spec = [(16, 1, 1)] + [(24, 2, 6), (24, 1, 6)] + [(32, 2, 6)] + [(32, 1, 6)] * 2 + [(64, 2, 6)] + \
            [(64, 1, 6)] * 3 + [(96, 1, 6)] * 3 + [(160, 2, 6)] + [(160, 1, 6)] * 2 + [(320, 1, 6)]
        for block_id, (filters, stride, expansion) in enumerate(spec):
            inputs, prefix = x, f'block_{block_id}_' if block_id else 'expanded_conv_'
            if block_id:
                x = F.relu6(self.bn(self.conv(x, prefix + 'expand', expansion * x.shape[1]), prefix + 'expand_BN'))
            if stride == 2:
                x = self.zero_pad(x, 3)
            x = self.depthwise(x, prefix + 'depthwise', 3, stride, 'same' if stride == 1 else 'valid')
            x = F.relu6(self.bn(x, prefix + 'depthwise_BN'))
            x = self.bn(self.conv(x, prefix + 'project', filters), prefix + 'project_BN')
            if inputs.shape[1] == filters and stride == 1:
                x = inputs + x
        x = F.relu6(self.bn(self.conv(x, 'Conv_1', 1280), 'Conv_1_bn'))
        return self.dense(x.mean((2, 3)), 'predictions', classes)

    # ---- keras/src/applications/nasnet.py ----
    def sep_block(self, x, filters, k, stride, block_id):
        x = F.relu(x)
        if stride == 2:
            x = self.separable(self.zero_pad(x, k), f'separable_conv_1_{block_id}', filters, k, 2, 'valid')
        else:
            x = self.separable(x, f'separable_conv_1_{block_id}', filters, k, 1, 'same')
        x = F.relu(self.bn(x, f'separable_conv_1_bn_{block_id}'))
        x = self.separable(x, f'separable_conv_2_{block_id}', filters, k, 1, 'same')
        return self.bn(x, f'separable_conv_2_bn_{block_id}')

    def adjust(self, p, ip, filters, block_id):
        if p is None:
            return ip
        if p.shape[2] != ip.shape[2]:
            p = F.relu(p)
            p1 = self.conv(p[:, :, ::2, ::2], f'adjust_conv_1_{block_id}', filters // 2)
            p2 = self.pad(p, ((0, 1), (0, 1)))[:, :, 1:, 1:][:, :, ::2, ::2]
            p2 = self.conv(p2, f'adjust_conv_2_{block_id}', filters // 2)
            return self.bn(torch.cat([p1, p2], 1), f'adjust_bn_{block_id}')
        if p.shape[1] != filters:
            p = self.conv(F.relu(p), f'adjust_conv_projection_{block_id}', filters)
            return self.bn(p, f'adjust_bn_{block_id}')
        return p

    def normal_cell(self, ip, p, filters, b):
        p = self.adjust(p, ip, filters, b)
        h = self.bn(self.conv(F.relu(ip), f'normal_conv_1_{b}', filters), f'normal_bn_1_{b}')
        x1 = self.sep_block(h, filters, 5, 1, f'normal_left1_{b}') + self.sep_block(p, filters, 3, 1,
                                                                                   f'normal_right1_{b}')
        x2 = self.sep_block(p, filters, 5, 1, f'normal_left2_{b}') + self.sep_block(p, filters, 3, 1,
                                                                                   f'normal_right2_{b}')
        x3 = self.avg_same(h) + p
        x4 = self.avg_same(p) + self.avg_same(p)
        x5 = self.sep_block(h, filters, 3, 1, f'normal_left5_{b}') + h
        return torch.cat([p, x1, x2, x3, x4, x5], 1), ip

    def reduction_cell(self, ip, p, filters, b):
        p = self.adjust(p, ip, filters, b)
        h = self.bn(self.conv(F.relu(ip), f'reduction_conv_1_{b}', filters), f'reduction_bn_1_{b}')
        h3 = self.zero_pad(h, 3)
        x1 = self.sep_block(h, filters, 5, 2, f'reduction_left1_{b}') + self.sep_block(p, filters, 7, 2,
                                                                                      f'reduction_right1_{b}')
        x2 = F.max_pool2d(h3, 3, 2) + self.sep_block(p, filters, 7, 2, f'reduction_right2_{b}')
        x3 = F.avg_pool2d(h3, 3, 2) + self.sep_block(p, filters, 5, 2, f'reduction_right3_{b}')
        x4 = self.avg_same(x1) + x2
        x5 = self.sep_block(x1, filters, 3, 1, f'reduction_left4_{b}') + F.max_pool2d(h3, 3, 2)
        return torch.cat([x2, x3, x4, x5], 1), ip

    def nasnet_mobile(self, x, classes=1000, features=False):
        filters, n = 1056 // 24, 4
        x = self.bn(self.conv(x, 'stem_conv1', 32, 3, 2, padding='valid'), 'stem_bn1')
        x, p = self.reduction_cell(x, None, filters // 4, 'stem_1')
        x, p = self.reduction_cell(x, p, filters // 2, 'stem_2')
        for stage in range(3):
            f = filters * 2 ** stage
            if stage:
                x, p = self.reduction_cell(x, p, f, f'reduce_{stage * n}')  # skip_reduction=False: p = its input
            for i in range(n):
                x, p = self.normal_cell(x, p, f, str(stage * n + i + (stage > 0)))
        x = F.relu(x).mean((2, 3))
        return x if features else self.dense(x, 'predictions', classes)


def write_keras_h5(path, weights, chunks=1):
    """A Keras ``save_weights`` HDF5 file: root attribute ``layer_names`` (``chunks`` pieces as Keras splits large
    attributes), a group per layer with ``weight_names`` and the datasets; weightless layers included."""
    names = ['input_1'] + list(weights) + ['out_relu']
    with h5py.File(path, 'w') as f:
        encoded = np.array([n.encode() for n in names])
        if chunks == 1:
            f.attrs['layer_names'] = encoded
        else:
            for i, part in enumerate(np.array_split(encoded, chunks)):
                f.attrs[f'layer_names{i}'] = part
        f.attrs['backend'] = b'tensorflow'
        f.attrs['keras_version'] = b'2.2.4'
        for name in names:
            group = f.create_group(name)
            layer = weights.get(name, {})
            group.attrs['weight_names'] = np.array([f'{name}/{k}:0'.encode() for k in layer], dtype='S')
            for key, value in layer.items():
                group.create_dataset(f'{name}/{key}:0', data=value)
    return path


def reference_file(tmp_path, builder, size, chunks=1, seed=0):
    ref = KerasReference(seed)
    getattr(ref, builder)(torch.zeros(1, 3, size, size, dtype=torch.float64))  # creates every layer's weights
    return ref, write_keras_h5(tmp_path / f'{builder}.h5', ref.weights, chunks)


def images(size, n=2, seed=1):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_mobilenetv2_file_computes_as_keras(tmp_path, one_thread):
    """train.py's door (--pretrained-path FILE.h5): the file's layers land where Keras's MobileNetV2 uses them."""
    ref, path = reference_file(tmp_path, 'mobilenet_v2', 72, chunks=2)
    model = create_model('tf_mobilenetv2_100.keras_in1k', num_classes=1000, pretrained=True,
                         pretrained_path=str(path)).double().eval()
    for size in (72, 64):  # odd and even feature maps: Keras's correct_pad = TensorFlow "same"
        x = images(size)
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref.mobilenet_v2(x), rtol=1e-9, atol=1e-9)


def test_nasnet_mobile_file_computes_as_keras(tmp_path, one_thread):
    """timm.create_model's door (pretrained_cfg_overlay file): Keras's NASNetMobile wiring, names and pooling."""
    ref, path = reference_file(tmp_path, 'nasnet_mobile', 96)
    model = timm.create_model('nasnetamobile.keras_in1k', pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path))).double().eval()
    x = images(96)  # feature maps 47 / 24 / 12 / 6 / 3: odd and even sizes
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref.nasnet_mobile(x), rtol=1e-9, atol=1e-9)


def test_other_number_of_classes_keeps_a_fresh_head(tmp_path, one_thread):
    ref, path = reference_file(tmp_path, 'nasnet_mobile', 64, seed=3)
    model = create_model('nasnetamobile', num_classes=7, pretrained=True, pretrained_path=str(path)).double().eval()
    assert model.last_linear.weight.shape == (7, 1056)
    x = images(64)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(features, ref.nasnet_mobile(x, features=True), rtol=1e-9, atol=1e-9)


def test_bad_files_are_named(tmp_path):
    from lt_timm.models.keras_applications import load_keras_weights, read_keras_weights
    from lt_timm.models.nasnet import keras_plan
    model = timm.create_model('nasnetamobile')
    not_h5 = tmp_path / 'weights.h5'
    not_h5.write_bytes(b'\x00' * 64)
    with pytest.raises(ValueError, match='not an HDF5 file'):
        read_keras_weights(str(not_h5))
    empty = tmp_path / 'empty.h5'
    h5py.File(empty, 'w').close()
    with pytest.raises(ValueError, match='layer_names'):
        read_keras_weights(str(empty))
    _, mobilenet = reference_file(tmp_path, 'mobilenet_v2', 32)
    with pytest.raises(ValueError, match="no Keras layer 'stem_conv1'"):
        load_keras_weights(model, str(mobilenet), keras_plan(model), 'last_linear')
    ref = KerasReference()
    ref.weights = {k: dict(v) for k, v in reference_file(tmp_path, 'nasnet_mobile', 64)[0].weights.items()}
    ref.weights['stem_conv1'] = {'kernel': np.zeros((3, 3, 3, 40), np.float32)}  # another stem width
    wide = write_keras_h5(tmp_path / 'wide.h5', ref.weights)
    with pytest.raises(ValueError, match=r'conv0\.conv\.weight has shape \(40, 3, 3, 3\)'):
        load_keras_weights(model, str(wide), keras_plan(model), 'last_linear')


def test_train_cli_fine_tunes_from_a_keras_file(tmp_path, in_process):
    """train.py --pretrained --pretrained-path FILE.h5, 3 classes: loads and trains an epoch; garbage is named."""
    from conftest import make_image_folder
    from test_cli import RGB_FLAGS
    _, path = reference_file(tmp_path, 'mobilenet_v2', 32)
    data = make_image_folder(tmp_path / 'data', per_class=4)
    flags = [*RGB_FLAGS, '--model', 'tf_mobilenetv2_100', '--data-dir', data, '-b', '4', '--epochs', '1',
             '--aug-repeats', '2', '--loss', 'losstransform', '--lt-epoch', 'original', '--output', tmp_path / 'out']
    p = in_process('train.py', *flags, '--pretrained', '--pretrained-path', path, '--experiment', 'ok')
    assert p.returncode == 0, p.stderr[-2000:]
    assert f'Loading pretrained weights from file ({path})' in p.stdout + p.stderr
    assert (tmp_path / 'out' / 'ok' / 'summary.csv').is_file()
    bad = tmp_path / 'bad.h5'
    bad.write_bytes(b'not hdf5')
    p = in_process('train.py', *flags, '--pretrained', '--pretrained-path', bad, '--experiment', 'bad', check=False)
    assert p.returncode == 2 and 'not an HDF5 file' in p.stderr, p.stderr[-2000:]


@pytest.mark.parametrize('name, keras_total', [('tf_mobilenetv2_100', 3538984), ('nasnetamobile', 5326716)])
def test_sizes_are_keras_applications(name, keras_total):
    """Keras's model summaries count 3,538,984 (MobileNetV2) and 5,326,716 (NASNetMobile) parameters, BatchNorm
    moving statistics included; the timm models hold exactly as many numbers."""
    model = timm.create_model(name)
    params = sum(p.numel() for p in model.parameters())
    stats = sum(b.numel() for k, b in model.named_buffers() if k.endswith(('running_mean', 'running_var')))
    assert params + stats == keras_total
