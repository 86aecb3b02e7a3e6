"""Reading manifests: files into line-numbered data, then validated `JobSpec`s."""
