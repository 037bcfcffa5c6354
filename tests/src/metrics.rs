//! Reading the services' Prometheus endpoints from tests and benchmarks: one scrape over
//! plain HTTP/1.0 (no client library, no chunked encoding to undo) and one sample's value.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// GET /metrics from `addr`; the whole response, headers included. Fails unless the status is
/// 200 or if the server takes more than 10 s.
pub async fn scrape(addr: SocketAddr) -> Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to the metrics endpoint {addr}"))?;
    tcp.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut body))
        .await
        .context("the metrics endpoint did not answer in 10 s")??;
    let text = String::from_utf8(body).context("metrics response is not UTF-8")?;
    let status_ok =
        text.starts_with("HTTP/1.") && text.lines().next().is_some_and(|l| l.contains(" 200"));
    if !status_ok {
        bail!("metrics endpoint answered {:.200}", text);
    }
    Ok(text)
}

/// The value of the sample named `name` whose labels include all of `labels`.
pub fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?;
            let ok = (rest.is_empty() || rest.starts_with('{'))
                && labels.iter().all(|l| rest.contains(l));
            if ok {
                value.parse().ok()
            } else {
                None
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_matches_name_and_labels_exactly() {
        let text = "# TYPE x counter\n\
                    x_total{rpc=\"A\",code=\"Ok\"} 3\n\
                    x_total{rpc=\"B\",code=\"Ok\"} 5\n\
                    x_total_more 9\n\
                    y 1.5\n";
        assert_eq!(sample(text, "x_total", &["rpc=\"B\""]), Some(5.0));
        assert_eq!(sample(text, "x_total", &["code=\"Ok\""]), Some(3.0));
        assert_eq!(sample(text, "y", &[]), Some(1.5));
        // A longer name that starts with the wanted one is another series.
        assert_eq!(sample(text, "x_total", &["rpc=\"C\""]), None);
        assert_eq!(sample("x_total_more 9\n", "x_total", &[]), None);
    }
}
