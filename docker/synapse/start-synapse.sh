#!/bin/sh
# The image's /data volume may be root-owned on first start; Synapse (uid 991 by
# default) writes its signing key and media there. Then the image's own start.
set -eu
mkdir -p /data/media_store
chown -R "${UID:-991}:${GID:-991}" /data
exec /start.py
