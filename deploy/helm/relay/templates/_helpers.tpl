{{/* Chart name, overridable. */}}
{{- define "relay.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Fully qualified app name: the release name, unless it lacks the chart name. */}}
{{- define "relay.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "relay.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{ include "relay.selectorLabels" . }}
{{- end -}}

{{- define "relay.selectorLabels" -}}
app.kubernetes.io/name: {{ include "relay.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Secret that holds the Redis password. */}}
{{- define "relay.redisSecretName" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecret -}}
{{- else -}}
{{- printf "%s-redis" (include "relay.fullname" .) -}}
{{- end -}}
{{- end -}}

{{- define "relay.redisSecretKey" -}}
{{- if .Values.redis.existingSecret -}}
{{- .Values.redis.existingSecretKey -}}
{{- else -}}
password
{{- end -}}
{{- end -}}

{{/* The config file: values.config, with redis.address filled in when the
     chart's own Redis is used and no address was given (and left out when
     empty otherwise: Sentinel and Cluster are found through redis.addresses).
     The chart's own Redis is one server: sentinel and cluster modes need
     yours. */}}
{{- define "relay.config" -}}
{{- $cfg := deepCopy .Values.config -}}
{{- $redis := default (dict) $cfg.redis -}}
{{- $mode := default "standalone" $redis.mode -}}
{{- if and .Values.redisServer.enabled (ne $mode "standalone") -}}
{{- fail (printf "config.redis.mode %s needs your own Redis Sentinel or Cluster: set redisServer.enabled=false and list the sentinels or seed nodes in config.redis.addresses" $mode) -}}
{{- end -}}
{{- if and (ne $mode "standalone") (not $redis.addresses) -}}
{{- fail (printf "config.redis.mode %s needs config.redis.addresses (the sentinels, or some cluster nodes, as host:port)" $mode) -}}
{{- end -}}
{{- if and .Values.redisServer.enabled (not $redis.address) -}}
{{- $_ := set $redis "address" (printf "%s-redis:6379" (include "relay.fullname" .)) -}}
{{- $_ := set $cfg "redis" $redis -}}
{{- else if and (hasKey $redis "address") (not $redis.address) -}}
{{- $_ := unset $redis "address" -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}
