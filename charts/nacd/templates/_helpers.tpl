{{- define "nacd.fullname" -}}
{{- printf "%s-nacd" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "nacd.labels" -}}
app.kubernetes.io/name: nacd
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "nacd.storageRoot" -}}
{{- if .Values.s3.prefix -}}
{{- printf "s3://%s/%s" .Values.s3.bucket (trimSuffix "/" .Values.s3.prefix) -}}
{{- else -}}
{{- printf "s3://%s" .Values.s3.bucket -}}
{{- end -}}
{{- end -}}
