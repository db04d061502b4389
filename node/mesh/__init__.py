"""The mesh: libp2p host, streams and limits, adverts, remote inference."""
