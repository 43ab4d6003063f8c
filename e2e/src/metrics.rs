//! Reading Prometheus text (what ds-server's and ds-sync's `/metrics` serve), and the tests that
//! keep compose.yaml's `metrics` profile, its Prometheus targets and the Grafana dashboard in step
//! with the binaries' addresses and series.

/// The value of the sample `series` (its name and labels exactly as exposed, e.g.
/// `ds_live_readers{mode="sse"}`) in `text`, if there is one.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// [`sample`], required: fails naming the series (with the text) when it is missing.
pub fn value(text: &str, series: &str) -> anyhow::Result<f64> {
    sample(text, series).ok_or_else(|| anyhow::anyhow!("no sample {series} in:\n{text}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose_file;
    use crate::fixtures;
    use yaml_rust2::{Yaml, YamlLoader};

    #[test]
    fn samples_are_found_by_exact_name_and_labels() {
        let text = "# HELP ds_appends_total x\n# TYPE ds_appends_total counter\n\
                    ds_appends_total 7\nds_appends_total_more 1\n\
                    ds_live_readers{mode=\"sse\"} 2\nds_live_readers{mode=\"long_poll\"} 0\n";
        assert_eq!(sample(text, "ds_appends_total"), Some(7.0));
        assert_eq!(sample(text, "ds_live_readers{mode=\"sse\"}"), Some(2.0));
        assert_eq!(
            sample(text, "ds_live_readers{mode=\"long_poll\"}"),
            Some(0.0)
        );
        assert_eq!(sample(text, "ds_live_readers"), None);
        assert!(value(text, "ds_nothing").is_err());
    }

    fn yaml_file(relative: &str) -> Yaml {
        let path = fixtures::workspace_root().join(relative);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
        let mut docs = YamlLoader::load_from_str(&text)
            .unwrap_or_else(|e| panic!("{relative} is not YAML: {e}"));
        assert_eq!(docs.len(), 1, "{relative} holds one document");
        docs.remove(0)
    }

    /// The port of a `host:port` value.
    fn port(addr: &str) -> &str {
        addr.rsplit_once(':').map(|(_, p)| p).unwrap_or_default()
    }

    #[test]
    fn the_metrics_profile_is_opt_in_and_everything_else_runs_without_it() {
        let compose = yaml_file("compose.yaml");
        let services = compose["services"].as_hash().expect("services");
        for (name, service) in services {
            let name = name.as_str().expect("service name");
            let profiles: Vec<&str> = service["profiles"]
                .as_vec()
                .map(|v| v.iter().filter_map(Yaml::as_str).collect())
                .unwrap_or_default();
            match name {
                "prometheus" | "grafana" => assert_eq!(profiles, ["metrics"], "{name}"),
                _ => assert!(profiles.is_empty(), "{name} must run without a profile"),
            }
        }
        let prometheus = &compose["services"]["prometheus"];
        // Envoy's admin API stays on loopback: Prometheus shares Envoy's network namespace.
        assert_eq!(prometheus["network_mode"].as_str(), Some("service:envoy"));
        assert_eq!(
            compose_file::service("envoy").env_var("ADMIN_HOST"),
            "127.0.0.1"
        );
        let mounts: Vec<&str> = prometheus["volumes"]
            .as_vec()
            .expect("prometheus volumes")
            .iter()
            .filter_map(Yaml::as_str)
            .collect();
        assert!(
            mounts.iter().any(|m| m.starts_with(
                "./fixtures/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml"
            )),
            "{mounts:?}"
        );
        // Only Envoy's public listener and Grafana are published; never a metrics port.
        for (name, service) in services {
            for published in service["ports"].as_vec().into_iter().flatten() {
                let published = published.as_str().unwrap_or_default();
                assert!(
                    published.starts_with("127.0.0.1:"),
                    "{name:?} publishes {published} beyond loopback"
                );
                assert!(
                    !published.contains("9464") && !published.contains("9465"),
                    "{name:?} publishes a metrics port"
                );
            }
        }
    }

    #[test]
    fn prometheus_scrapes_the_addresses_compose_gives_the_binaries() {
        let config = yaml_file("fixtures/prometheus/prometheus.yml");
        let jobs = config["scrape_configs"].as_vec().expect("scrape_configs");
        let target = |job: &str| -> (String, String) {
            let scrape = jobs
                .iter()
                .find(|j| j["job_name"].as_str() == Some(job))
                .unwrap_or_else(|| panic!("no scrape job {job}"));
            let targets = scrape["static_configs"][0]["targets"]
                .as_vec()
                .expect("targets");
            assert_eq!(targets.len(), 1, "{job}");
            (
                targets[0].as_str().expect("target").to_owned(),
                scrape["metrics_path"]
                    .as_str()
                    .unwrap_or("/metrics")
                    .to_owned(),
            )
        };
        let server = compose_file::service("ds-server").env_var("DS_METRICS__ADDR");
        assert_eq!(
            target("ds-server"),
            (format!("ds-server:{}", port(&server)), "/metrics".into())
        );
        let sync = compose_file::service("ds-sync").env_var("DS_SYNC__METRICS_ADDR");
        assert_eq!(
            target("ds-sync"),
            (format!("ds-sync:{}", port(&sync)), "/metrics".into())
        );
        let admin = compose_file::service("envoy").env_var("ADMIN_PORT");
        assert_eq!(
            target("envoy"),
            (format!("127.0.0.1:{admin}"), "/stats/prometheus".into())
        );
    }

    #[test]
    fn the_dashboard_queries_only_series_the_readme_lists() {
        let root = fixtures::workspace_root();
        let text = std::fs::read_to_string(root.join("fixtures/grafana/ds-dashboard.json"))
            .expect("dashboard");
        let dashboard: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
        let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
        let metrics_section = readme
            .split("\n## Metrics\n")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("README has a ## Metrics section");
        let mut exprs = Vec::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().into_iter().flatten() {
                exprs.push(target["expr"].as_str().expect("expr").to_owned());
            }
        }
        assert!(exprs.len() >= 10, "{exprs:?}");
        for expr in &exprs {
            // Label values (`"ds_public"`) are not series: only what is outside quotes.
            let outside: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
            for word in outside.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !word.starts_with("ds_") {
                    continue;
                }
                // A histogram's series are its name plus _bucket, _sum or _count.
                let name = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .unwrap_or(word);
                assert!(
                    metrics_section.contains(&format!("`{name}`")),
                    "the dashboard queries {word}, which README's Metrics section does not list"
                );
            }
        }
        let datasource = yaml_file("fixtures/grafana/provisioning/datasources/prometheus.yml");
        assert_eq!(
            datasource["datasources"][0]["uid"].as_str(),
            Some("prometheus")
        );
    }
}
