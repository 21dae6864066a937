//! Evaluation: the kNN monitor (weighted k-nearest-neighbour vote on L2-normalized features),
//! feature extraction over a source with the deterministic evaluation transform, and the two
//! baselines every reported number stands next to (default-init network, raw pixels).
pub mod baseline;
pub mod knn;
pub mod monitor;

pub use baseline::{random_init_model, raw_pixels, Baselines, Standardizer};
pub use knn::{extract_features, knn_accuracy, knn_classify, KnnResult};
pub use monitor::{KnnMonitor, KnnReport};
