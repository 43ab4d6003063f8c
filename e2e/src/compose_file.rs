//! compose.yaml, parsed, for the tests that keep the harness and the compose stack in step (the
//! harness starts the same processes with the same variables; only addresses differ).

use yaml_rust2::{Yaml, YamlLoader};

use crate::fixtures;

/// One service of compose.yaml.
pub struct Service {
    name: String,
    yaml: Yaml,
}

/// The service `name` of the workspace's compose.yaml.
pub fn service(name: &str) -> Service {
    let path = fixtures::workspace_root().join("compose.yaml");
    let text = std::fs::read_to_string(&path).expect("read compose.yaml");
    let mut docs = YamlLoader::load_from_str(&text).expect("compose.yaml is YAML");
    assert_eq!(docs.len(), 1, "compose.yaml holds one document");
    let yaml = docs.remove(0)["services"][name].clone();
    assert!(!yaml.is_badvalue(), "compose.yaml has no service {name}");
    Service {
        name: name.to_owned(),
        yaml,
    }
}

impl Service {
    /// `image:`.
    pub fn image(&self) -> &str {
        self.yaml["image"]
            .as_str()
            .unwrap_or_else(|| panic!("service {} has no image", self.name))
    }

    /// `environment:` as a map (a list form would fail here: the file uses maps).
    pub fn env(&self) -> Vec<(String, String)> {
        let map = self.yaml["environment"]
            .as_hash()
            .unwrap_or_else(|| panic!("service {}: environment is not a map", self.name));
        map.iter()
            .map(|(key, value)| {
                let key = key
                    .as_str()
                    .expect("environment key is a string")
                    .to_owned();
                let value = match value {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    Yaml::Boolean(b) => b.to_string(),
                    other => panic!("service {}: {key} is {other:?}", self.name),
                };
                (key, value)
            })
            .collect()
    }

    /// The value of environment variable `key`, which must be set.
    pub fn env_var(&self, key: &str) -> String {
        self.env()
            .into_iter()
            .find_map(|(k, v)| (k == key).then_some(v))
            .unwrap_or_else(|| panic!("service {} does not set {key}", self.name))
    }

    /// A top-level string key of the service, e.g. `stop_grace_period`.
    pub fn string(&self, key: &str) -> &str {
        self.yaml[key]
            .as_str()
            .unwrap_or_else(|| panic!("service {}: {key} is not a string", self.name))
    }

    /// `command:` as a list of strings.
    pub fn command(&self) -> Vec<String> {
        self.strings("command")
    }

    /// `entrypoint:` as a list of strings.
    pub fn entrypoint(&self) -> Vec<String> {
        self.strings("entrypoint")
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.yaml[key]
            .as_vec()
            .unwrap_or_else(|| panic!("service {}: {key} is not a list", self.name))
            .iter()
            .map(|part| part.as_str().expect("a string").to_owned())
            .collect()
    }
}

/// Seconds of a duration written as whole seconds (`"20s"`), the only form compose.yaml uses.
pub fn seconds(duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{duration:?} is not a number of seconds like \"20s\""))
}

/// The default of a value compose takes from the environment, `${KEY:-default}`; fails when the
/// value has another form or names another variable.
pub fn default_from_environment<'a>(value: &'a str, key: &str) -> &'a str {
    value
        .strip_prefix("${")
        .and_then(|rest| rest.strip_suffix('}'))
        .and_then(|inner| inner.strip_prefix(key))
        .and_then(|rest| rest.strip_prefix(":-"))
        .unwrap_or_else(|| panic!("{value:?} is not ${{{key}:-default}}"))
}
