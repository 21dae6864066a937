//! ResNet-18/34/50 in torchvision's layout and parameter names, without the final `fc` layer.
//!
//! `width` is the stem's and layer1's channel count (torchvision: 64); layer2..4 double it each
//! time, so the representation has `8 × width` features (× 4 for ResNet-50). A width of w costs
//! about (w/64)² of the standard network's FLOPs and parameters.
//!
//! Inputs are always 3-channel (N, 3, H, W) float tensors: the data pipeline replicates grayscale
//! images to RGB before normalisation, so `conv1` always has 3 input channels, exactly as in
//! torchvision and the official Barlow Twins code.
use tch::nn::init::{FanInOut, NonLinearity, NormalOrUniform};
use tch::nn::{self, Init};
use tch::Tensor;

use crate::Result;

use super::batch_norm::{BatchNorm, BnMode};
use super::{each, join, relu, Arch, NamedTensor, TensorRole};

/// torchvision's conv init: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
const CONV_INIT: Init = Init::Kaiming {
    dist: NormalOrUniform::Normal,
    fan: FanInOut::FanOut,
    non_linearity: NonLinearity::ReLU,
};

/// A bias-free 2-d convolution (`nn.Conv2d(..., bias=False)`).
#[derive(Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    stride: i64,
    padding: i64,
}

impl Conv2d {
    fn new(p: &nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64, padding: i64) -> Result<Self> {
        let weight = p.f_var("weight", &[c_out, c_in, k, k], CONV_INIT)?;
        Ok(Conv2d {
            weight,
            stride,
            padding,
        })
    }

    fn forward(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        each(xs, |x| {
            Ok(x.f_conv2d(
                &self.weight,
                None::<&Tensor>,
                [self.stride, self.stride],
                [self.padding, self.padding],
                [1, 1],
                1,
            )?)
        })
    }

    fn collect(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        out.push(NamedTensor::new(
            prefix,
            "weight",
            &self.weight,
            TensorRole::Parameter,
        ));
    }
}

/// `downsample = Sequential(conv1x1(stride), BatchNorm2d)`: keys `downsample.0.weight`,
/// `downsample.1.*`.
#[derive(Debug)]
struct Downsample {
    conv: Conv2d,
    bn: BatchNorm,
}

#[derive(Debug)]
enum BlockKind {
    /// conv3x3(stride)-bn-relu-conv3x3-bn (expansion 1).
    Basic,
    /// conv1x1-bn-relu-conv3x3(stride)-bn-relu-conv1x1-bn (expansion 4; torchvision "v1.5").
    Bottleneck { conv3: Conv2d, bn3: BatchNorm },
}

#[derive(Debug)]
struct Block {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    kind: BlockKind,
    downsample: Option<Downsample>,
}

impl Block {
    fn new(
        p: &nn::Path,
        bottleneck: bool,
        in_planes: i64,
        planes: i64,
        stride: i64,
        zero_init_residual: bool,
    ) -> Result<Self> {
        let last_gamma = if zero_init_residual { 0.0 } else { 1.0 };
        let expansion = if bottleneck { 4 } else { 1 };
        let out_planes = planes * expansion;
        let downsample = if stride != 1 || in_planes != out_planes {
            let d = p / "downsample";
            Some(Downsample {
                conv: Conv2d::new(&(&d / "0"), in_planes, out_planes, 1, stride, 0)?,
                bn: BatchNorm::new(&(&d / "1"), out_planes, 1.0)?,
            })
        } else {
            None
        };
        if bottleneck {
            Ok(Block {
                conv1: Conv2d::new(&(p / "conv1"), in_planes, planes, 1, 1, 0)?,
                bn1: BatchNorm::new(&(p / "bn1"), planes, 1.0)?,
                conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, stride, 1)?,
                bn2: BatchNorm::new(&(p / "bn2"), planes, 1.0)?,
                kind: BlockKind::Bottleneck {
                    conv3: Conv2d::new(&(p / "conv3"), planes, out_planes, 1, 1, 0)?,
                    bn3: BatchNorm::new(&(p / "bn3"), out_planes, last_gamma)?,
                },
                downsample,
            })
        } else {
            Ok(Block {
                conv1: Conv2d::new(&(p / "conv1"), in_planes, planes, 3, stride, 1)?,
                bn1: BatchNorm::new(&(p / "bn1"), planes, 1.0)?,
                conv2: Conv2d::new(&(p / "conv2"), planes, planes, 3, 1, 1)?,
                bn2: BatchNorm::new(&(p / "bn2"), planes, last_gamma)?,
                kind: BlockKind::Basic,
                downsample,
            })
        }
    }

    fn forward(&self, xs: &[Tensor], m: BnMode) -> Result<Vec<Tensor>> {
        let out = relu(&self.bn1.forward(&self.conv1.forward(xs)?, m)?)?;
        let mut out = self.bn2.forward(&self.conv2.forward(&out)?, m)?;
        if let BlockKind::Bottleneck { conv3, bn3 } = &self.kind {
            out = bn3.forward(&conv3.forward(&relu(&out)?)?, m)?;
        }
        let identity = match &self.downsample {
            Some(d) => d.bn.forward(&d.conv.forward(xs)?, m)?,
            None => xs.iter().map(Tensor::shallow_clone).collect(),
        };
        out.iter()
            .zip(&identity)
            .map(|(o, i)| Ok(o.f_add(i)?.f_relu()?))
            .collect()
    }

    fn collect(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        // torchvision's state_dict order: conv1, bn1, conv2, bn2, [conv3, bn3], downsample.
        self.conv1.collect(&join(prefix, "conv1"), out);
        self.bn1.collect(&join(prefix, "bn1"), out);
        self.conv2.collect(&join(prefix, "conv2"), out);
        self.bn2.collect(&join(prefix, "bn2"), out);
        if let BlockKind::Bottleneck { conv3, bn3 } = &self.kind {
            conv3.collect(&join(prefix, "conv3"), out);
            bn3.collect(&join(prefix, "bn3"), out);
        }
        if let Some(d) = &self.downsample {
            d.conv.collect(&join(prefix, "downsample.0"), out);
            d.bn.collect(&join(prefix, "downsample.1"), out);
        }
    }
}

/// The ResNet trunk: stem, layer1..layer4, global average pool; outputs (N, 8·width) for
/// ResNet-18/34 and (N, 32·width) for ResNet-50: 512 and 2048 at torchvision's width 64.
#[derive(Debug)]
pub struct ResNet {
    conv1: Conv2d,
    bn1: BatchNorm,
    cifar_stem: bool,
    layers: Vec<Vec<Block>>,
    out_dim: i64,
}

impl ResNet {
    /// `cifar_stem`: 3×3 stride-1 `conv1` and no max-pool (for 32×32 inputs); the key names are
    /// unchanged, only `conv1.weight`'s shape differs (64×3×3×3 instead of 64×3×7×7).
    /// `stem_stride`: that convolution's stride (1 or 2; the ImageNet stem ignores it). `width`:
    /// channels of the stem and layer1 (64 in torchvision; layer k has `width · 2^(k-1)`).
    pub fn new(
        p: &nn::Path,
        arch: Arch,
        cifar_stem: bool,
        stem_stride: i64,
        zero_init_residual: bool,
        width: i64,
    ) -> Result<Self> {
        if width < 1 {
            return Err(crate::Error::Config(format!(
                "model.width: {width} must be positive"
            )));
        }
        if !(1..=2).contains(&stem_stride) {
            return Err(crate::Error::Config(format!(
                "model.stem_stride: {stem_stride} must be 1 or 2"
            )));
        }
        if stem_stride != 1 && !cifar_stem {
            return Err(crate::Error::Config(format!(
                "model.stem_stride: {stem_stride} applies to the CIFAR stem only (cifar_stem = \
                 true); the ImageNet stem's 7x7 convolution has stride 2"
            )));
        }
        let (bottleneck, counts): (bool, [usize; 4]) = match arch {
            Arch::Resnet18 => (false, [2, 2, 2, 2]),
            Arch::Resnet34 => (false, [3, 4, 6, 3]),
            Arch::Resnet50 => (true, [3, 4, 6, 3]),
        };
        let expansion = if bottleneck { 4 } else { 1 };
        let conv1 = if cifar_stem {
            Conv2d::new(&(p / "conv1"), 3, width, 3, stem_stride, 1)?
        } else {
            Conv2d::new(&(p / "conv1"), 3, width, 7, 2, 3)?
        };
        let bn1 = BatchNorm::new(&(p / "bn1"), width, 1.0)?;
        let mut in_planes = width;
        let mut layers = Vec::with_capacity(4);
        for (li, (&n, planes)) in counts
            .iter()
            .zip([width, 2 * width, 4 * width, 8 * width])
            .enumerate()
        {
            let lp = p / format!("layer{}", li + 1);
            let mut blocks = Vec::with_capacity(n);
            for bi in 0..n {
                let stride = if bi == 0 && li > 0 { 2 } else { 1 };
                blocks.push(Block::new(
                    &(&lp / bi),
                    bottleneck,
                    in_planes,
                    planes,
                    stride,
                    zero_init_residual,
                )?);
                in_planes = planes * expansion;
            }
            layers.push(blocks);
        }
        Ok(ResNet {
            conv1,
            bn1,
            cifar_stem,
            layers,
            out_dim: 8 * width * expansion,
        })
    }

    /// Width of the pooled representation (512 or 2048 at the standard width).
    pub fn out_dim(&self) -> i64 {
        self.out_dim
    }

    /// Pooled representations, one per view (see [`BatchNorm::forward`] for how views share a
    /// layer).
    pub fn forward(&self, xs: &[Tensor], m: BnMode) -> Result<Vec<Tensor>> {
        let mut h = relu(&self.bn1.forward(&self.conv1.forward(xs)?, m)?)?;
        if !self.cifar_stem {
            h = each(&h, |x| {
                Ok(x.f_max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false)?)
            })?;
        }
        for layer in &self.layers {
            for block in layer {
                h = block.forward(&h, m)?;
            }
        }
        each(&h, |x| {
            Ok(x.f_adaptive_avg_pool2d([1, 1])?.f_flatten(1, -1)?)
        })
    }

    pub fn collect(&self, prefix: &str, out: &mut Vec<NamedTensor>) {
        self.conv1.collect(&join(prefix, "conv1"), out);
        self.bn1.collect(&join(prefix, "bn1"), out);
        for (li, layer) in self.layers.iter().enumerate() {
            for (bi, block) in layer.iter().enumerate() {
                block.collect(&join(prefix, &format!("layer{}.{}", li + 1, bi)), out);
            }
        }
    }
}
