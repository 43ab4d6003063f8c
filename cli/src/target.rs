//! Which URL a stream argument names.
//!
//! The base URL comes from `--url`, else `DS_URL`, else `STREAM_URL` (the upstream CLI's
//! variable), else [`DEFAULT_BASE_URL`]. A stream argument is then:
//! - a whole URL (`https://host/v1/stream/chat`): used as it is;
//! - a path (`/v1/stream/chat`): that path on the base URL's host;
//! - a name (`chat`, `orders/2026`): appended to the base URL, as the upstream CLI does.

use reqwest::Url;

use crate::error::CliError;

/// reqwest re-exports `Url` but not its parse error.
type UrlParseError = <Url as std::str::FromStr>::Err;

/// Where this server listens by default, with the path its README uses for streams.
pub const DEFAULT_BASE_URL: &str = "http://127.0.0.1:4437/v1/stream";

/// The base URL from the flag or the environment, in the order above.
pub fn base_url(flag: Option<&str>) -> Result<Url, CliError> {
    let text = match flag {
        Some(url) => url.to_owned(),
        None => std::env::var("DS_URL")
            .or_else(|_| std::env::var("STREAM_URL"))
            .unwrap_or_else(|_| DEFAULT_BASE_URL.to_owned()),
    };
    let url = Url::parse(&text)
        .map_err(|e| CliError::Usage(format!("base url {text:?} is not a URL: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(CliError::Usage(format!(
            "base url {text:?} must be http or https"
        )));
    }
    Ok(url)
}

/// The URL of `stream` (see the module doc).
pub fn stream_url(base: &Url, stream: &str) -> Result<Url, CliError> {
    if stream.is_empty() {
        return Err(CliError::Usage("stream name is empty".to_owned()));
    }
    let bad_url = |e: UrlParseError| CliError::Usage(format!("stream {stream:?}: {e}"));
    if stream.starts_with("http://") || stream.starts_with("https://") {
        return Url::parse(stream).map_err(bad_url);
    }
    if stream.starts_with('/') {
        return base.join(stream).map_err(bad_url);
    }
    // Url::join replaces the last path segment unless the base ends with '/'.
    let mut base = base.clone();
    if !base.path().ends_with('/') {
        let path = format!("{}/", base.path());
        base.set_path(&path);
    }
    base.join(stream).map_err(bad_url)
}

/// The path (and query) part of a stream URL: what `Stream-Forked-From` names.
pub fn path_of(url: &Url) -> String {
    url.path().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(text: &str) -> Url {
        Url::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn names_are_relative_to_the_base_and_paths_to_its_host() {
        let b = base("http://127.0.0.1:4437/v1/stream");
        let url = |s: &str| stream_url(&b, s).map(|u| u.to_string()).unwrap_or_default();
        assert_eq!(url("chat"), "http://127.0.0.1:4437/v1/stream/chat");
        assert_eq!(
            url("orders/2026"),
            "http://127.0.0.1:4437/v1/stream/orders/2026"
        );
        assert_eq!(url("/other/x"), "http://127.0.0.1:4437/other/x");
        assert_eq!(url("https://h:1/v1/stream/y"), "https://h:1/v1/stream/y");
        let slash = base("https://edge:8443/v1/stream/");
        assert_eq!(
            stream_url(&slash, "chat")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            "https://edge:8443/v1/stream/chat"
        );
        let root = base("https://edge:8443");
        assert_eq!(
            stream_url(&root, "v1/stream/chat")
                .map(|u| u.to_string())
                .unwrap_or_default(),
            "https://edge:8443/v1/stream/chat"
        );
        assert!(matches!(stream_url(&b, ""), Err(CliError::Usage(_))));
    }

    #[test]
    fn only_http_base_urls() {
        assert!(base_url(Some("ftp://x/")).is_err());
        assert!(base_url(Some("not a url")).is_err());
        assert!(base_url(Some("https://x:1/v1/stream")).is_ok());
    }
}
