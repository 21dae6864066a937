//! The job spec's default values (the `#[serde(default = "defaults::…")]` of its fields).
use super::{Backbone, DataSource, LossForm, MemoryFormat, Precision};

pub fn name() -> String {
    "barlow-twins".into()
}
pub fn one() -> u32 {
    1
}
pub fn one_f() -> f64 {
    1.0
}
pub fn yes() -> bool {
    true
}
pub fn source() -> DataSource {
    DataSource::FashionMnist
}
pub fn data_path() -> String {
    "/usr/share/datasets/fashion-mnist".into()
}
pub fn image_size() -> u32 {
    28
}
pub fn min_scale() -> f64 {
    0.08
}
pub fn max_ratio() -> f64 {
    4.0 / 3.0
}
pub fn threads() -> u32 {
    1
}
pub fn prefetch() -> u32 {
    4
}
pub fn backbone() -> Backbone {
    Backbone::Resnet18
}
pub fn projector() -> Vec<i64> {
    vec![8192, 8192, 8192]
}
pub fn width() -> u32 {
    64
}
pub fn batch_size() -> u32 {
    256
}
pub fn lr_weights() -> f64 {
    0.2
}
pub fn lr_biases() -> f64 {
    0.0048
}
pub fn weight_decay() -> f64 {
    1e-6
}
pub fn lambda() -> f64 {
    super::DEFAULT_LAMBDA
}
pub fn warmup_epochs() -> f64 {
    10.0
}
pub fn log_every() -> u32 {
    10
}
pub fn picture_every() -> u32 {
    50
}
pub fn loss_form() -> LossForm {
    LossForm::Auto
}
pub fn precision() -> Precision {
    Precision::Auto
}
pub fn memory_format() -> MemoryFormat {
    MemoryFormat::Auto
}
pub fn keep_last() -> u32 {
    3
}
pub fn max_restarts() -> u32 {
    2
}
pub fn timeout_secs() -> u32 {
    60
}
pub fn knn_k() -> u32 {
    200
}
pub fn knn_temperature() -> f64 {
    0.1
}
pub fn bank_size() -> u32 {
    5000
}
pub fn test_size() -> u32 {
    1000
}
pub fn probe_epochs() -> u32 {
    10
}
