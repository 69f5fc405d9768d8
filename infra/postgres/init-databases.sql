-- Runs once, on the first start of an empty Postgres volume: one database per service.
-- Both are owned by POSTGRES_USER (the password comes from the environment, never from this file).
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
