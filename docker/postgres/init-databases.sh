#!/bin/sh
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d).
# Synapse requires C collation and ctype, hence template0.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres <<SQL
CREATE ROLE synapse LOGIN PASSWORD '${SYNAPSE_DB_PASSWORD}';
CREATE DATABASE synapse OWNER synapse
    ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0;
CREATE ROLE hivebridge LOGIN PASSWORD '${HIVEBRIDGE_DB_PASSWORD}';
CREATE DATABASE hivebridge OWNER hivebridge ENCODING 'UTF8';
SQL
