//! Evaluation: the kNN monitor (weighted k-nearest-neighbour vote on L2-normalized features) and
//! feature extraction over a source with the deterministic evaluation transform.
pub mod knn;

pub use knn::{extract_features, knn_accuracy, knn_classify, KnnResult};
