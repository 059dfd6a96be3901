{{- define "saga-streams.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "saga-streams.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "saga-streams.labels" -}}
app.kubernetes.io/name: {{ include "saga-streams.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "saga-streams.selector" -}}
app.kubernetes.io/name: {{ include "saga-streams.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: orchestrator
{{- end -}}

{{/* A secret file's path, when its key is set. */}}
{{- define "saga-streams.secretPath" -}}
{{- printf "/run/secrets/saga/%s" . -}}
{{- end -}}

{{/* Environment shared by the orchestrator and the simulators: Kafka, registry, secrets. */}}
{{- define "saga-streams.commonEnv" -}}
- name: SAGA_STREAMS_BOOTSTRAP
  value: {{ .Values.bootstrap | quote }}
{{- range $k, $v := .Values.kafka }}
- name: {{ printf "SAGA_STREAMS_KAFKA_%s" ($k | replace "." "_" | replace "-" "_" | upper) }}
  value: {{ $v | toString | quote }}
{{- end }}
{{- with .Values.secrets }}
{{- if .kafkaPasswordKey }}
- name: SAGA_STREAMS_KAFKA_SASL_PASSWORD_FILE
  value: {{ include "saga-streams.secretPath" .kafkaPasswordKey | quote }}
{{- end }}
{{- if .caKey }}
- name: SAGA_STREAMS_KAFKA_SSL_CA_LOCATION
  value: {{ include "saga-streams.secretPath" .caKey | quote }}
{{- end }}
{{- if .signingKeysKey }}
- name: SAGA_STREAMS_SIGNING_KEYS
  value: {{ include "saga-streams.secretPath" .signingKeysKey | quote }}
{{- end }}
{{- end }}
{{- with .Values.schemaRegistry }}
{{- if .url }}
- name: SAGA_STREAMS_SCHEMA_REGISTRY_URL
  value: {{ .url | quote }}
{{- end }}
{{- if .user }}
- name: SAGA_STREAMS_SCHEMA_REGISTRY_USER
  value: {{ .user | quote }}
{{- end }}
{{- end }}
{{- if .Values.secrets.registryPasswordKey }}
- name: SAGA_STREAMS_SCHEMA_REGISTRY_PASSWORD_FILE
  value: {{ include "saga-streams.secretPath" .Values.secrets.registryPasswordKey | quote }}
{{- end }}
{{- if and .Values.secrets.caKey .Values.schemaRegistry.url }}
- name: SAGA_STREAMS_SCHEMA_REGISTRY_CA
  value: {{ include "saga-streams.secretPath" .Values.secrets.caKey | quote }}
{{- end }}
{{- if .Values.topology }}
- name: SAGA_STREAMS_TOPOLOGY
  value: /app/topology/topology.yaml
{{- end }}
{{- end -}}

{{- define "saga-streams.httpScheme" -}}
{{- if and .Values.secrets.httpTlsCertKey .Values.secrets.httpTlsKeyKey -}}HTTPS{{- else -}}HTTP{{- end -}}
{{- end -}}
