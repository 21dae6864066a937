//! Unit tests of the job spec: defaults, field-naming errors, closed sets, overrides, elastic
//! world sizes and the shipped examples.
use super::*;

fn field_of(text: &str) -> String {
    JobSpec::from_toml_str(text).unwrap_err().field
}

#[test]
fn defaults_are_valid() {
    let s = JobSpec::from_toml_str("").unwrap();
    assert_eq!(s.world_size, 1);
    assert_eq!(s.train.lambda, 0.0051);
    assert_eq!(JobSpec::default(), s);
    let back = JobSpec::from_toml_str(&s.to_toml()).unwrap();
    assert_eq!(back, s);
}

#[test]
fn errors_name_the_field() {
    assert_eq!(field_of("[train]\nbatch_size = 0"), "train.batch_size");
    assert_eq!(field_of("[train]\nbatch_size = -4"), "train.batch_size");
    assert_eq!(
        field_of("[train]\nbatch_size = \"big\""),
        "train.batch_size"
    );
    assert_eq!(field_of("[train]\nbogus = 1"), "train.bogus");
    assert!(JobSpec::from_toml_str("[train]\nbogus = 1")
        .unwrap_err()
        .message
        .contains("bogus"));
    assert_eq!(field_of("world_size = 100000"), "world_size");
    assert_eq!(
        field_of("world_size = 3\n[train]\nbatch_size = 64"),
        "train.batch_size"
    );
    assert_eq!(field_of("[model]\nbackbone = \"vit\""), "model.backbone");
    assert_eq!(field_of("[model]\nwidth = 2"), "model.width");
    assert_eq!(field_of("[model]\nwidth = -8"), "model.width");
    assert_eq!(JobSpec::default().model.width, 64);
    assert_eq!(JobSpec::default().model.stem_stride, 1);
    assert_eq!(field_of("[model]\nstem_stride = 3"), "model.stem_stride");
    assert_eq!(
        field_of("[model]\ncifar_stem = false\nstem_stride = 2"),
        "model.stem_stride"
    );
    assert!(JobSpec::from_toml_str("[model]\nstem_stride = 2").is_ok());
    assert_eq!(field_of("nonsense = ["), "spec");
    assert_eq!(field_of("[train]\nprecision = \"fp16\""), "train.precision");
    assert_eq!(
        field_of("[train]\nmemory_format = \"nhwc\""),
        "train.memory_format"
    );
    let s =
        JobSpec::from_toml_str("[train]\nprecision = \"bf16\"\nmemory_format = \"channels-last\"")
            .unwrap();
    assert_eq!(
        (s.train.precision.as_str(), s.train.memory_format.as_str()),
        ("bf16", "channels-last")
    );
}

/// A closed set's bad value is a parse error naming the field and listing the valid values;
/// every valid spelling parses to itself.
fn check_closed_set<T>(table: &str, key: &str, all: &[T], get: impl Fn(&JobSpec) -> T)
where
    T: Copy + std::fmt::Display + std::fmt::Debug + PartialEq + std::str::FromStr<Err = String>,
{
    let e = JobSpec::from_toml_str(&format!("[{table}]\n{key} = \"resnet9000\"")).unwrap_err();
    assert_eq!(e.field, format!("{table}.{key}"), "{e}");
    for v in all {
        assert!(e.message.contains(&format!("`{v}`")), "{v} missing in: {e}");
    }
    let e = JobSpec::from_toml_with_overrides("", &[format!("{table}.{key}=bogus")]).unwrap_err();
    assert_eq!(e.field, format!("{table}.{key}"), "{e}");
    for v in all {
        let s = JobSpec::from_toml_str(&format!("[{table}]\n{key} = \"{v}\"")).unwrap();
        assert_eq!(get(&s), *v);
        assert!(s.to_toml().contains(&format!("{key} = \"{v}\"")));
        assert_eq!(v.to_string().parse::<T>().unwrap(), *v);
    }
}

#[test]
fn backbone_is_a_closed_set() {
    check_closed_set("model", "backbone", Backbone::ALL, |s| s.model.backbone);
    assert_eq!("resnet50".parse::<Backbone>().unwrap(), Backbone::Resnet50);
    assert!("resnet9000"
        .parse::<Backbone>()
        .unwrap_err()
        .contains("resnet18, resnet34, resnet50"));
}

#[test]
fn data_source_is_a_closed_set() {
    check_closed_set("data", "source", DataSource::ALL, |s| s.data.source);
    let spellings: Vec<&str> = DataSource::ALL.iter().map(|v| v.as_str()).collect();
    assert_eq!(
        spellings,
        ["fashion-mnist", "mnist", "image-folder", "synthetic"]
    );
}

#[test]
fn loss_form_is_a_closed_set() {
    check_closed_set("train", "loss_form", LossForm::ALL, |s| s.train.loss_form);
    assert_eq!(JobSpec::default().train.loss_form, LossForm::Auto);
}

#[test]
fn precision_is_a_closed_set() {
    check_closed_set("train", "precision", Precision::ALL, |s| s.train.precision);
    assert_eq!(JobSpec::default().train.precision, Precision::Auto);
}

#[test]
fn memory_format_is_a_closed_set() {
    check_closed_set("train", "memory_format", MemoryFormat::ALL, |s| {
        s.train.memory_format
    });
    assert_eq!(
        "channels-last".parse::<MemoryFormat>().unwrap(),
        MemoryFormat::ChannelsLast
    );
}

#[test]
fn overrides_apply_with_types() {
    let s = JobSpec::from_toml_with_overrides(
        "world_size = 2",
        &[
            "train.batch_size=64".into(),
            "name=quick".into(),
            "model.projector=[64, 64]".into(),
        ],
    )
    .unwrap();
    assert_eq!(s.train.batch_size, 64);
    assert_eq!(s.name, "quick");
    assert_eq!(s.model.projector, vec![64, 64]);
    let e = JobSpec::from_toml_with_overrides("", &["train.batch_size".into()]).unwrap_err();
    assert!(e.message.contains("key=value"));
    let e = JobSpec::from_toml_with_overrides("", &["name.x=1".into()]).unwrap_err();
    assert_eq!(e.field, "name");
}

#[test]
fn elastic_world_sizes_keep_the_global_batch_whole() {
    let sizes = |text: &str| JobSpec::from_toml_str(text).unwrap().allowed_world_sizes();
    assert_eq!(sizes("world_size = 4\n[train]\nbatch_size = 16"), [4]);
    let elastic = "world_size = 4\n[elastic]\nmin_world_size = 1\n[train]\nbatch_size =";
    // 3 does not divide 16: skipped.
    assert_eq!(sizes(&format!("{elastic} 16")), [4, 2, 1]);
    assert_eq!(sizes(&format!("{elastic} 12")), [4, 3, 2, 1]);
    assert_eq!(
        sizes("world_size = 6\n[elastic]\nmin_world_size = 3\n[train]\nbatch_size = 24"),
        [6, 4, 3]
    );
    assert_eq!(
        sizes("world_size = 2\n[elastic]\nmin_world_size = 2\n[train]\nbatch_size = 8"),
        [2]
    );
    let over = "world_size = 2\n[elastic]\nmin_world_size = 3\n[train]\nbatch_size = 8";
    assert_eq!(field_of(over), "elastic.min_world_size");
    // Elastic in name only: 3 cannot split 16.
    let none = "world_size = 4\n[elastic]\nmin_world_size = 3\n[train]\nbatch_size = 16";
    let e = JobSpec::from_toml_str(none).unwrap_err();
    assert_eq!(e.field, "elastic.min_world_size", "{e}");
    assert_eq!(field_of("[elastic]\nmax = 1"), "elastic.max");
    assert_eq!(JobSpec::default().elastic.min_world_size, 0);
}

#[test]
fn the_examples_are_valid() {
    let demo = JobSpec::from_toml_str(include_str!("../../../examples/demo.toml")).unwrap();
    assert_eq!(demo.allowed_world_sizes(), [2, 1]);
    for text in [
        include_str!("../../../examples/gpu.toml"),
        include_str!("../../../examples/quality.toml"),
    ] {
        JobSpec::from_toml_str(text).unwrap();
    }
}

#[test]
fn crop_ratio_and_erasing_are_checked_and_named() {
    let s = JobSpec::from_toml_str("").unwrap();
    assert_eq!((s.data.max_ratio, s.data.erase_p), (4.0 / 3.0, 0.0));
    let ok = JobSpec::from_toml_str("[data]\nmax_ratio = 1.0\nerase_p = 0.5").unwrap();
    assert_eq!((ok.data.max_ratio, ok.data.erase_p), (1.0, 0.5));
    assert_eq!(field_of("[data]\nmax_ratio = 0.5"), "data.max_ratio");
    assert_eq!(field_of("[data]\nerase_p = 1.5"), "data.erase_p");
    assert_eq!(field_of("[data]\nerase_p = -0.1"), "data.erase_p");
}
